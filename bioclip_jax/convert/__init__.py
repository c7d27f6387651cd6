"""Weights interchange with PyTorch open_clip: `state_dict` (the naming table), `files` (formats on disk) and
`checkpoint` (whole conversions and exports)."""
