"""pybioclip's file formats, parsed and written by the library (bioclip_jax.inference.io), not by the CLI."""

from __future__ import annotations

import pytest

from bioclip_jax.errors import InputError
from bioclip_jax.inference import io


def test_labels_from_a_file_or_a_comma_list(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("Ursus arctos\n\n  Canis lupus \n")
    assert io.read_labels(str(path)) == ["Ursus arctos", "Canis lupus"]
    assert io.read_labels("cat, dog,,bird") == ["cat", "dog", "bird"]


def test_bins_and_subset_and_taxa(tmp_path):
    bins = tmp_path / "bins.csv"
    bins.write_text("cls,bin\nmagpie,bird\nraven,bird\nwolf,mammal\n")
    assert io.read_bins(str(bins)) == {"magpie": "bird", "raven": "bird", "wolf": "mammal"}
    bins.write_text("magpie,bird\nwolf\n")
    with pytest.raises(InputError, match=r"bins.csv: expected two columns .* rows \[2\]"):
        io.read_bins(str(bins))
    subset = tmp_path / "subset.csv"
    subset.write_text("Order\nCarnivora\nPasseriformes\n")
    assert io.read_subset(str(subset)) == ("order", ["Carnivora", "Passeriformes"])
    taxa = tmp_path / "taxa.csv"
    taxa.write_text("kingdom,phylum,class,order,family,genus,species,common_name\n"
                    "Animalia,Chordata,Aves,Passeriformes,Corvidae,Pica,Pica hudsonia,black-billed magpie\n")
    (taxon,) = io.read_taxa(str(taxa))
    assert taxon.text("taxon_com") == ("a photo of Animalia Chordata Aves Passeriformes Corvidae Pica hudsonia with "
                                       "common name black-billed magpie.")
    taxa.write_text("kingdom,species\n,\n")
    with pytest.raises(InputError, match="rows without any rank: \\[2\\]"):
        io.read_taxa(str(taxa))


def test_rows_as_csv_and_table():
    rows = [{"file_name": "a.jpg", "classification": "magpie", "score": 0.75},
            {"file_name": "a.jpg", "classification": "raven", "score": 0.25}]
    assert io.format_rows(rows, "csv") == ("file_name,classification,score\na.jpg,magpie,0.75\n"
                                           "a.jpg,raven,0.25\n")
    table = io.format_rows(rows, "table").splitlines()
    assert table[1] == "| file_name | classification | score |" and table[3] == "| a.jpg     | magpie         | 0.75  |"
    assert io.format_rows([], "csv") == "file_name,classification,score\n"
    with pytest.raises(InputError, match="format 'json'"):
        io.format_rows(rows, "json")
