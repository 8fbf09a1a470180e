"""npe2 reader: a BraTS case folder or NIfTI file -> image layers + tumour labels."""

from __future__ import annotations

from pathlib import Path

from napari_unet import NapariUnetError


def _claims(path: Path) -> bool:
    from napari_unet.cases import is_nifti

    if path.is_file():
        return is_nifti(path)
    if path.is_dir():
        try:
            entries = list(path.iterdir())
        except OSError:
            return True  # so the user hears why from us
        if not entries:
            return True  # so the user hears "empty folder" from us, not "no reader"
        return any(is_nifti(p) for p in entries) or any(
            p.is_dir() and any(is_nifti(q) for q in _entries(p)) for p in entries
        ) or (path / "imagesTr").is_dir()
    return False


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def get_reader(path):
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return read_case_layers if _claims(Path(path)) else None


def read_case_layers(path):
    """Read one case; on bad input show one clear notification and open nothing."""
    from napari_unet.cases import find_cases, read_case
    from napari_unet.layers import case_layer_data

    if isinstance(path, list):
        path = path[0]
    try:
        cases = find_cases(path)
        if len(cases) > 1:
            raise NapariUnetError(
                f"{path}: this folder holds {len(cases)} cases; open one of them "
                f"(e.g. {Path(cases[0]).name})"
            )
        case = read_case(cases[0])
        if case.warnings:
            from napari.utils.notifications import show_warning

            for warning in case.warnings:
                show_warning(warning)
        return case_layer_data(case)
    except NapariUnetError as err:
        from napari.utils.notifications import show_error

        show_error(str(err))
        return [(None,)]


# Folders are matched with a trailing separator; a BraTS case folder (and a dataset root) has
# "BraTS" in its path in any case, whatever the release's naming.
BRATS_FOLDER_PATTERN = "*[Bb][Rr][Aa][Tt][Ss]*/"


def prefer_this_reader() -> None:
    """napari's built-in reader claims every file and folder but cannot read NIfTI, so napari asks
    which reader to use each time: make napari-unet the reader of .nii/.nii.gz files and of BraTS
    folders, unless the user chose another."""
    from napari.settings import get_settings

    preferences = get_settings().plugins.extension2reader
    missing = {pattern: "napari-unet" for pattern in ("*.nii", "*.nii.gz", BRATS_FOLDER_PATTERN)
               if pattern not in preferences}
    if missing:
        get_settings().plugins.extension2reader = {**preferences, **missing}
