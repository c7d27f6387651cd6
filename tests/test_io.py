"""pybioclip's file formats, parsed and written by the library (bioclip_jax.inference.io), not by the CLI."""

from __future__ import annotations

import warnings

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
    bins.write_text("magpie,bird\nraven,bird\nwolf\n")
    with pytest.raises(InputError, match=r"bins.csv: line 3: expected a label and its bin, got \['wolf'\]"):
        io.read_bins(str(bins))
    subset = tmp_path / "subset.csv"
    subset.write_text("Order\nCarnivora\nPasseriformes\n")
    assert io.read_subset(str(subset)) == ("order", ["Carnivora", "Passeriformes"])
    subset.write_text("clade\nCarnivora\n")
    with pytest.raises(InputError, match="The first column of .*subset.csv is named 'clade' but must be one of "
                                         "kingdom,phylum,class,order,family,genus,species."):
        io.read_subset(str(subset))
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


def test_bins_first_row_is_always_a_header_as_pybioclip(tmp_path):
    """pybioclip reads --bins with pd.read_csv(index_col=0): any first row is the header, the label is the first
    column and the bin the second; further columns are ignored."""
    bins = tmp_path / "bins.csv"
    bins.write_text("species,group,notes\nmagpie,bird,x\nwolf,mammal,\n")
    assert io.read_bins(str(bins)) == {"magpie": "bird", "wolf": "mammal"}
    bins.write_text("only_one_column\nmagpie\n")
    with pytest.raises(InputError, match="bins.csv: expected a header row and at least two columns"):
        io.read_bins(str(bins))
    bins.write_text("label,bin\nmagpie,bird\nmagpie,mammal\n")
    with pytest.raises(InputError, match="line 3: label 'magpie' is in bin 'bird' already"):
        io.read_bins(str(bins))


def test_byte_order_marks_are_not_part_of_the_first_cell(tmp_path):
    bom = "\ufeff"
    (tmp_path / "bins.csv").write_text(bom + "magpie,bird\nwolf,mammal\nraven,bird\n", encoding="utf-8")
    assert io.read_bins(str(tmp_path / "bins.csv")) == {"wolf": "mammal", "raven": "bird"}  # header: not a class
    (tmp_path / "labels.txt").write_text(bom + "Ursus arctos\nCanis lupus\n", encoding="utf-8")
    assert io.read_labels(str(tmp_path / "labels.txt")) == ["Ursus arctos", "Canis lupus"]
    (tmp_path / "subset.csv").write_text(bom + "family\nCorvidae\n", encoding="utf-8")
    assert io.read_subset(str(tmp_path / "subset.csv")) == ("family", ["Corvidae"])
    (tmp_path / "taxa.csv").write_text(bom + "kingdom,genus,species\nAnimalia,Pica,hudsonia\n", encoding="utf-8")
    assert io.read_taxa(str(tmp_path / "taxa.csv"))[0].kingdom == "Animalia"


@pytest.mark.parametrize("reader, name", [(io.read_bins, "bins.csv"), (io.read_labels, "labels.txt"),
                                          (io.read_subset, "subset.csv"), (io.read_taxa, "taxa.csv")])
def test_files_that_are_not_utf8_are_named(reader, name, tmp_path):
    path = tmp_path / name
    path.write_bytes("family,bin\nCorvidae,bird\nL\u00e9pidopt\u00e8res,insect\n".encode("latin-1"))
    with pytest.raises(InputError, match=rf"{name}: line 3 is not UTF-8 \(byte 0xe9\); save the file as UTF-8"):
        reader(str(path))


def test_label_values_that_look_like_missing_files_or_one_label_warn(tmp_path):
    with pytest.warns(io.InputWarning, match="'x,labesl.txt' looks like a file name but there is no such file"):
        assert io.read_labels("x,labesl.txt") == ["x", "labesl.txt"]
    with pytest.warns(io.InputWarning, match="looks like a file name"):
        io.read_labels(str(tmp_path / "labels") + ",dog")
    with pytest.warns(io.InputWarning, match="only one label \\('cat'\\): every image will score 1.0"):
        io.read_labels("cat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert io.read_labels("cat,dog") == ["cat", "dog"]


def test_output_paths_are_checked(tmp_path):
    assert io.check_output(None) is None and io.check_output("stdout") is None
    assert io.check_output(str(tmp_path / "out.csv")) == str(tmp_path / "out.csv")
    with pytest.raises(InputError, match="is a directory"):
        io.check_output(str(tmp_path))
    with pytest.raises(InputError, match="folder .*missing does not exist"):
        io.check_output(str(tmp_path / "missing" / "out.csv"))
