"""Find a BraTS case in any layout, read it in one orientation, write labels back.

Every layout the project knows (BraTS 2020, 2021, 2023 GLI, the Medical Segmentation
Decathlon's Task01 and single files) is read into the same form: one float32 volume per
modality and canonical uint8 labels, all in the display orientation below. A `CaseSource`
record of where the data came from (layout, affine, header, orientation) travels with the
arrays, so writing labels back reproduces the source's orientation, affine and label values.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_mod

from napari_unet import NapariUnetError
from napari_unet.atomic import atomic_path
from napari_unet.labels import LAYOUT_CONVENTION, from_canonical, to_canonical

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
LAYOUTS: tuple[str, ...] = ("brats2020", "brats2021", "brats2023", "msd")

# Arrays inside the project are (axial, row, column) with the axial index growing towards
# the top of the head, anterior at the top of the screen and the patient's right on the
# screen's left (the radiological convention).
DISPLAY_AXCODES = ("S", "P", "L")

# Filename suffix of each modality, per layout.
_SUFFIXES = {
    "brats2020": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}
_SUFFIXES["brats2021"] = _SUFFIXES["brats2020"]
# The order of the channels in a Decathlon Task01 4D image (its dataset.json).
MSD_CHANNELS = ("flair", "t1", "t1ce", "t2")

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_MASK_SUFFIXES = ("_brainmask", "_brain_mask", "-brainmask", "_mask")


def case_id_of(path: Path) -> str:
    """A NIfTI file's name without its extension."""
    return _NIFTI.sub("", path.name)


def is_nifti(path: Path) -> bool:
    return bool(_NIFTI.search(path.name))


@dataclass
class CaseSource:
    """Where a case came from: all that is needed to write labels back as the source holds them.

    Plain data only (the header is its 348-byte block, base64), so it can travel in napari
    layer metadata and in JSON.
    """

    layout: str
    case_id: str
    path: str
    affine: list[list[float]]
    shape: list[int]  # the files' voxel shape
    header: str  # base64 of the NIfTI-1 header of the segmentation (or of an image)
    label_dtype: str
    spacing: list[float]  # mm, in display order
    files: dict[str, str] = field(default_factory=dict)
    label_convention: str = ""  # when the file's values are not its layout's (BraTS 2013-2015 files)

    @property
    def voxel_ml(self) -> float:
        """One voxel's volume in millilitres."""
        return float(np.prod(self.spacing)) / 1000

    @property
    def convention(self) -> str:
        return self.label_convention or LAYOUT_CONVENTION[self.layout]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CaseSource":
        return cls(**data)

    def nifti_header(self) -> nib.Nifti1Header:
        return nib.Nifti1Header(binaryblock=base64.b64decode(self.header))

    # Orientation: file voxel order <-> display order.
    def _file_ornt(self) -> np.ndarray:
        return ornt_mod.io_orientation(np.asarray(self.affine))

    def to_display(self, array: np.ndarray) -> np.ndarray:
        transform = ornt_mod.ornt_transform(self._file_ornt(), ornt_mod.axcodes2ornt(DISPLAY_AXCODES))
        return np.ascontiguousarray(ornt_mod.apply_orientation(array, transform))

    def to_file(self, array: np.ndarray) -> np.ndarray:
        transform = ornt_mod.ornt_transform(ornt_mod.axcodes2ornt(DISPLAY_AXCODES), self._file_ornt())
        return np.ascontiguousarray(ornt_mod.apply_orientation(array, transform))

    def display_affine(self) -> np.ndarray:
        """Display voxel index -> world position (mm)."""
        transform = ornt_mod.ornt_transform(self._file_ornt(), ornt_mod.axcodes2ornt(DISPLAY_AXCODES))
        return np.asarray(self.affine) @ ornt_mod.inv_ornt_aff(transform, self.shape)

    @property
    def axial_size(self) -> int:
        """Slices along the axial axis (the file axis nearest to superior-inferior)."""
        return int(self.shape[_axial_file_axis(self._file_ornt())])

    def axial_to_file_index(self, display_index: int) -> int:
        """The file's voxel index along its axial axis for a display axial index."""
        ornt = self._file_ornt()
        file_axis = _axial_file_axis(ornt)
        flip = ornt[file_axis, 1] < 0  # this axis runs inferior in the file
        n = self.shape[file_axis]
        return n - 1 - display_index if flip else display_index

    def file_to_axial_index(self, file_index: int) -> int:
        # The mapping is its own inverse (identity or a flip).
        return self.axial_to_file_index(file_index)


def _axial_file_axis(ornt: np.ndarray) -> int:
    """Which file voxel axis runs along the head's long (S-I) axis."""
    # io_orientation's output axis 2 is the world z (S) axis.
    return int(np.flatnonzero(ornt[:, 0] == 2)[0])


@dataclass
class Case:
    """One case in the display orientation: images per modality (float32), canonical labels."""

    case_id: str
    images: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: CaseSource
    warnings: list[str] = field(default_factory=list)  # shown to the user; the case is still usable

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.source.spacing)

    @property
    def shape(self) -> tuple[int, int, int]:
        return next(iter(self.images.values())).shape

    def stack(self, modalities: tuple[str, ...] = MODALITIES) -> np.ndarray:
        """(C, Z, Y, X) float32 in the order of `modalities`."""
        missing = [m for m in modalities if m not in self.images]
        if missing:
            raise NapariUnetError(
                f"{self.source.path}: the model needs {', '.join(missing)}, which this case lacks "
                f"(it has {', '.join(self.images) or 'no images'})"
            )
        return np.stack([self.images[m] for m in modalities])


# --------------------------------------------------------------------------- finding cases


@dataclass
class CaseFiles:
    layout: str
    case_id: str
    path: Path
    images: dict[str, Path]  # modality -> file (msd: every modality -> the 4D file)
    seg: Path | None
    brain_mask: Path | None = None  # a brain mask that came with the images


def _nifti_files(folder: Path) -> list[Path]:
    # Hidden files are never data: among them are the temporary files of interrupted writes.
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))


def _match_suffix(stem: str, suffix: str) -> bool:
    return stem.lower().endswith(suffix.lower())


def _find_in_folder(folder: Path) -> CaseFiles:
    try:
        files = _nifti_files(folder)
    except OSError as err:
        raise NapariUnetError(f"{folder}: cannot list the folder ({err.strerror or err})") from None
    if not files:
        others = [p.name for p in folder.iterdir()] if folder.exists() else []
        hint = f" (it holds {', '.join(sorted(others)[:5])})" if others else " (it is empty)"
        raise NapariUnetError(f"{folder}: no NIfTI files (.nii or .nii.gz) found{hint}")
    stems = {p: case_id_of(p) for p in files}
    layout = None
    if any(_match_suffix(s, "-t1n") or _match_suffix(s, "-t2f") for s in stems.values()):
        layout = "brats2023"
    elif any(_match_suffix(s, suffix) for s in stems.values() for suffix in ("_flair", "_t1", "_t1ce", "_t2")):
        layout = "brats2021" if folder.name.lower().startswith("brats2021") else "brats2020"
    if layout is None:
        names = ", ".join(p.name for p in files[:5])
        raise NapariUnetError(
            f"{folder}: not a BraTS case folder: no file ends in _t1/_t1ce/_t2/_flair (2020, 2021) "
            f"or -t1n/-t1c/-t2w/-t2f (2023); found {names}"
        )
    suffixes = _SUFFIXES[layout]
    images: dict[str, Path] = {}
    for modality in MODALITIES:  # clinical protocols often lack one or two: any found are read
        hits = [p for p, s in stems.items() if _match_suffix(s, suffixes[modality])]
        if hits:
            images[modality] = hits[0]
    # One public BraTS 2020 case names its segmentation *_Segm.nii; accept any *seg* file.
    taken = set(images.values())
    segs = [p for p, s in stems.items() if p not in taken and "seg" in s.lower()]
    masks = [p for p, s in stems.items() if p not in taken and s.lower().endswith(_MASK_SUFFIXES)]
    return CaseFiles(layout, folder.name, folder, images, segs[0] if segs else None, masks[0] if masks else None)


def _msd_label_for(image: Path) -> Path | None:
    labels_dir = image.parent.parent / "labelsTr"
    candidate = labels_dir / image.name
    return candidate if candidate.exists() else None


def find_case(path: str | os.PathLike) -> CaseFiles:
    """Work out the layout of one case given as a folder or a file."""
    path = Path(path)
    if not path.exists():
        raise NapariUnetError(f"{path}: no such file or folder")
    if path.is_dir():
        return _find_in_folder(path)
    if not is_nifti(path):
        raise NapariUnetError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    stem = case_id_of(path)
    # A Decathlon image: 4D, in imagesTr/imagesTs, or named like BRATS_001.
    if path.parent.name in ("imagesTr", "imagesTs") or re.fullmatch(r"BRATS_\d+", stem):
        return CaseFiles("msd", stem, path, {m: path for m in MSD_CHANNELS}, _msd_label_for(path))
    if path.parent.name == "labelsTr":
        return CaseFiles("msd", stem, path, {}, path)
    for layout in ("brats2023", "brats2020"):
        for modality, suffix in _SUFFIXES[layout].items():
            if _match_suffix(stem, suffix):
                case_id = stem[: -len(suffix)]
                if modality == "seg":
                    return CaseFiles(layout, case_id, path, {}, path)
                return CaseFiles(layout, case_id, path, {modality: path}, None)
    return CaseFiles("single", stem, path, {"image": path}, None)


def find_cases(path: str | os.PathLike, max_depth: int = 3) -> list[Path]:
    """Case paths under `path`: the case itself, the case folders inside it, or Decathlon images.

    Dataset roots as they are distributed nest the case folders a level or two down (Kaggle's
    BraTS 2020: `BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/BraTS20_Training_001/`),
    so folders without cases are searched `max_depth` levels deep.
    """
    path = Path(path)
    if not path.exists():
        raise NapariUnetError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    found = _cases_below(path, max_depth)
    if not found:
        raise NapariUnetError(f"{path}: no BraTS cases found (no case folders with NIfTI files)")
    return found


def _subfolders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise NapariUnetError(f"{path}: cannot list the folder ({err.strerror or err})") from None


def _readable_nifti_files(folder: Path) -> list[Path]:
    """The folder's NIfTI files; none where it cannot be listed (a dataset root may hold such)."""
    try:
        return _nifti_files(folder)
    except OSError:
        return []


def _cases_below(path: Path, depth: int) -> list[Path]:
    if (path / "imagesTr").is_dir():
        path = path / "imagesTr"
    try:
        files = _nifti_files(path)
    except OSError as err:
        raise NapariUnetError(f"{path}: cannot list the folder ({err.strerror or err})") from None
    if files and (path.name in ("imagesTr", "imagesTs") or all(re.fullmatch(r"BRATS_\d+", case_id_of(p)) for p in files)):
        return files
    if files:
        return [path]
    subfolders = _subfolders(path)
    cases = [p for p in subfolders if _readable_nifti_files(p)]
    if cases or depth <= 0:
        return cases
    return [case for sub in subfolders for case in _cases_below(sub, depth - 1)]


# --------------------------------------------------------------------------- reading


# Far beyond any MRI volume (BraTS: 9 million voxels); a header declaring more is damaged.
MAX_VOXELS = 2**30


def _load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a NIfTI file fully, turning every failure into a message naming the file."""
    try:
        img = nib.load(str(path))
    except nib.filebasedimages.ImageFileError:
        img = _load_uncompressed_gz(path)
        if img is None:
            raise NapariUnetError(f"{path}: not a NIfTI file") from None
    except PermissionError:
        raise NapariUnetError(f"{path}: permission denied") from None
    except Exception as err:  # noqa: BLE001  (a damaged header fails in many ways inside nibabel)
        raise NapariUnetError(f"{path}: cannot be read: its header is damaged ({type(err).__name__}: {err})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NapariUnetError(f"{path}: not a NIfTI image ({type(img).__name__})")
    shape = tuple(int(n) for n in img.shape)
    if any(n <= 0 for n in shape) or int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
        raise NapariUnetError(f"{path}: its header declares {' x '.join(map(str, shape))} voxels, "
                              "which is no MRI volume (the header is damaged)")
    _check_affine(img, path)
    try:
        data = np.asanyarray(img.dataobj)
    except MemoryError:
        raise NapariUnetError(f"{path}: not enough memory to read {' x '.join(map(str, shape))} voxels") from None
    except Exception as err:  # noqa: BLE001
        raise NapariUnetError(f"{path}: the file is damaged or truncated ({type(err).__name__}: {err})") from None
    return data, img


def _load_uncompressed_gz(path: Path):
    """A .nii.gz that was never compressed (a renamed .nii; some converters write them), read as
    the .nii it is; None when it is not one."""
    try:
        with open(path, "rb") as f:
            if not path.name.lower().endswith(".gz") or f.read(2) == b"\x1f\x8b":  # the gzip magic
                return None
        raw = path.read_bytes()
    except OSError:
        return None
    for image_class in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return image_class.from_bytes(raw)
        except Exception:  # noqa: BLE001  (not this kind of header: the caller says "not a NIfTI file")
            continue
    return None


def _check_affine(img, path: Path) -> None:
    try:
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # noqa: BLE001
        raise NapariUnetError(f"{path}: its voxel-to-world transform cannot be read ({err})") from None
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise NapariUnetError(f"{path}: its voxel-to-world transform (sform/qform) holds NaN or infinite values")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise NapariUnetError(f"{path}: its voxel-to-world transform (sform/qform) is singular: "
                              "the voxels have no position or size")
    try:
        ornt_mod.ornt_transform(ornt_mod.io_orientation(affine), ornt_mod.axcodes2ornt(DISPLAY_AXCODES))
    except ValueError:
        raise NapariUnetError(f"{path}: its voxel-to-world transform (sform/qform) does not give each voxel "
                              "axis its own head axis (the header is damaged)") from None


def _check_values(data: np.ndarray, path: Path) -> None:
    if data.dtype.kind in "fc":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise NapariUnetError(f"{path}: {bad} voxel(s) are NaN or infinite; fix or mask them before opening")


def _background_to_zero(data: np.ndarray) -> tuple[np.ndarray, float]:
    """Images already z-scored (or shifted) have a constant, non-zero background: the most common
    value, filling a good part of the volume. Shift it to 0, as the brain finding and the display
    expect; the z-score inside the brain is unchanged. Returns (data, the shift or 0)."""
    if data.dtype.kind not in "fiu" or data.size == 0:
        return data, 0.0
    values, counts = np.unique(data[::4, ::4, ::4], return_counts=True)
    mode = values[np.argmax(counts)]
    if mode == 0 or counts.max() < 0.2 * counts.sum():
        return data, 0.0
    return data.astype(np.float32) - np.float32(mode), float(mode)


def _background_warning(images: dict[str, np.ndarray], path) -> str | None:
    """A warning when the background is not 0, which the brain finding relies on for now."""
    for modality, image in images.items():
        sample = image[::4, ::4, ::4]  # a subsample: the background is most of the volume
        if np.count_nonzero(sample == 0) < 0.05 * sample.size:
            return (f"{path}: the {modality.upper()} background is not 0 (z-scored or shifted intensities?); "
                    "the brain is taken to be the non-zero voxels, so proposals will be poor")
    return None


def _check_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise NapariUnetError(
            f"{path}: expected a 3D volume, found {data.ndim}D data of shape {tuple(data.shape)}"
        )
    return data


def _same_geometry(ref_img, ref_path: Path, img, path: Path, shape) -> None:
    if tuple(shape) != tuple(ref_img.shape[:3]):
        raise NapariUnetError(
            f"{path}: shape {tuple(shape)} differs from {ref_path.name} {tuple(ref_img.shape[:3])}"
        )
    if not np.allclose(img.affine, ref_img.affine, atol=1e-3):
        raise NapariUnetError(
            f"{path}: its affine (voxel-to-world position) differs from {ref_path.name}; "
            "the modalities must be co-registered"
        )


def _spacing_display(img, transform) -> list[float]:
    # From the affine, which positions the voxels, not pixdim, which some writers leave at 0.
    zooms = np.sqrt((np.asarray(img.affine, dtype=float)[:3, :3] ** 2).sum(axis=0))
    out = np.empty(3)
    for src_axis, (dst_axis, _flip) in enumerate(transform):
        out[int(dst_axis)] = zooms[src_axis]
    return out.tolist()


def make_source(
    layout: str,
    case_id: str,
    path,
    geometry_img: nib.Nifti1Image,
    *,
    header_img: nib.Nifti1Image | None = None,
    label_dtype: str = "uint8",
    files: dict[str, str] | None = None,
) -> CaseSource:
    """The source record of a case whose voxels lie on the grid of `geometry_img`."""
    header_img = header_img if header_img is not None else geometry_img
    transform = ornt_mod.ornt_transform(
        ornt_mod.io_orientation(geometry_img.affine), ornt_mod.axcodes2ornt(DISPLAY_AXCODES)
    )
    return CaseSource(
        layout=layout,
        case_id=case_id,
        path=str(path),
        affine=np.asarray(geometry_img.affine, dtype=float).tolist(),
        shape=[int(s) for s in geometry_img.shape[:3]],
        header=base64.b64encode(header_img.header.binaryblock).decode("ascii"),
        label_dtype=label_dtype,
        spacing=_spacing_display(geometry_img, transform),
        files=files or {},
    )


def read_case(path: str | os.PathLike, *, with_labels: bool = True) -> Case:
    """Read one case (folder or file, any layout) into the display orientation."""
    files = find_case(path)
    raw: dict[str, np.ndarray] = {}
    ref_img = ref_path = None
    if files.layout == "msd" and files.images:
        data, ref_img = _load(files.path)
        ref_path = files.path
        if data.ndim != 4 or data.shape[3] != len(MSD_CHANNELS):
            raise NapariUnetError(
                f"{files.path}: a Decathlon BraTS image must be 4D with {len(MSD_CHANNELS)} channels "
                f"({', '.join(MSD_CHANNELS)}), found shape {tuple(data.shape)}"
            )
        _check_values(data, files.path)
        for channel, modality in enumerate(MSD_CHANNELS):
            raw[modality] = data[..., channel]
    else:
        for modality, file in files.images.items():
            data, img = _load(file)
            data = _check_3d(data, file)
            _check_values(data, file)
            if ref_img is None:
                ref_img, ref_path = img, file
            else:
                _same_geometry(ref_img, ref_path, img, file, data.shape)
            raw[modality] = data

    notes = []
    if files.brain_mask is not None and raw:
        mask_raw, mask_img = _load(files.brain_mask)
        mask_raw = _check_3d(mask_raw, files.brain_mask)
        _same_geometry(ref_img, ref_path, mask_img, files.brain_mask, mask_raw.shape)
        brain = np.asarray(mask_raw) > 0
        raw = {m: np.where(brain, _background_to_zero(v)[0], 0) for m, v in raw.items()}
    else:
        for modality, data in list(raw.items()):
            raw[modality], shifted = _background_to_zero(data)
            if shifted:
                notes.append(f"{files.path}: the {modality.upper()} background ({shifted:g}) is shown as 0")
    seg_raw = seg_img = None
    if files.seg is not None and with_labels:
        seg_raw, seg_img = _load(files.seg)
        seg_raw = _check_3d(seg_raw, files.seg)
        if ref_img is not None:
            _same_geometry(ref_img, ref_path, seg_img, files.seg, seg_raw.shape)
    if ref_img is None and seg_img is None:
        raise NapariUnetError(f"{files.path}: nothing to read")
    convention = ""
    if seg_raw is not None and detect_convention(files.layout, seg_raw) != LAYOUT_CONVENTION[files.layout]:
        convention = detect_convention(files.layout, seg_raw)
    geometry_img = ref_img if ref_img is not None else seg_img
    source = make_source(
        files.layout,
        files.case_id,
        files.path,
        geometry_img,
        header_img=seg_img if seg_img is not None else geometry_img,
        label_dtype=str(np.dtype(seg_img.get_data_dtype())) if seg_img is not None else "uint8",
        files={k: str(v) for k, v in files.images.items()} | ({"seg": str(files.seg)} if files.seg else {}),
    )
    source.label_convention = convention
    images = {m: source.to_display(np.asarray(v, dtype=np.float32)) for m, v in raw.items()}
    labels = None
    if seg_raw is not None:
        labels = source.to_display(to_canonical(seg_raw, source.convention, str(files.seg)))
    missing = [m.upper() for m in MODALITIES if m not in images]
    if images and missing and files.layout != "single":
        # The problem first: a notification shows its first line, and a path fills it.
        notes.append(f"{files.case_id}: no {', '.join(missing)} image (it has "
                     f"{', '.join(m.upper() for m in images)}); in {files.path}")
    warning = _background_warning(images, files.path)
    return Case(files.case_id, images, labels, source, notes + ([warning] if warning else []))


# --------------------------------------------------------------------------- writing


def save_nifti(img: nib.Nifti1Image, out: str | os.PathLike) -> Path:
    """Write `img` to `out` atomically: a crash leaves the previous file intact."""
    out = Path(out)
    if not is_nifti(out):
        raise NapariUnetError(f"{out}: the output must end in .nii or .nii.gz")
    # The temporary name keeps the extension: nibabel picks compression by it.
    with atomic_path(out, ".nii.gz" if out.name.lower().endswith(".gz") else ".nii") as tmp:
        img.to_filename(str(tmp))
    return out


def labels_to_nifti(labels: np.ndarray, source: CaseSource, *, canonical: bool = True) -> nib.Nifti1Image:
    """Display-oriented labels -> a NIfTI image in the source's orientation and convention."""
    labels = np.asarray(labels)
    expected = tuple(source.to_display(np.empty(source.shape, dtype=np.uint8)).shape)
    if labels.shape != expected:
        raise NapariUnetError(
            f"labels of shape {labels.shape} do not match the case {source.case_id} {expected}"
        )
    values = from_canonical(labels, source.convention) if canonical else labels.astype(np.uint8)
    if canonical and source.convention == "brats2015":
        values = _keep_non_enhancing(values, source)
    header = source.nifti_header()
    dtype = np.dtype(source.label_dtype)
    header.set_data_dtype(dtype)
    header.set_slope_inter(None, None)
    img = nib.Nifti1Image(source.to_file(values).astype(dtype), np.asarray(source.affine), header)
    return img


def _keep_non_enhancing(values: np.ndarray, source: CaseSource) -> np.ndarray:
    """BraTS 2015 files tell non-enhancing tumour (3) from necrosis (1); canonical labels do not.
    Where the source file held 3 and the label is still core, write 3 again (exact round trip)."""
    seg = source.files.get("seg")
    if not seg or not Path(seg).is_file():
        return values
    try:
        data = _check_3d(_load(Path(seg))[0], Path(seg))
    except NapariUnetError:  # the source went bad since it was opened: necrosis is still right
        return values
    if tuple(data.shape) != tuple(source.shape):  # the source was replaced by another volume
        return values
    original = source.to_display(np.asarray(data))
    return np.where((original == 3) & (values == 1), np.uint8(3), values)


def write_labels(labels: np.ndarray, source: CaseSource, out: str | os.PathLike, *, canonical: bool = True) -> Path:
    """Write display-oriented canonical labels to `out` as the source stores them."""
    return save_nifti(labels_to_nifti(labels, source, canonical=canonical), out)


def layout_paths(root: str | os.PathLike, layout: str, case_id: str) -> tuple[dict[str, Path], Path]:
    """Where a case of `layout` keeps its images and segmentation under `root`."""
    root = Path(root)
    if layout == "msd":
        image = root / "imagesTr" / f"{case_id}.nii.gz"
        return {m: image for m in MSD_CHANNELS}, root / "labelsTr" / f"{case_id}.nii.gz"
    suffixes = _SUFFIXES[layout]
    folder = root / case_id
    images = {m: folder / f"{case_id}{suffixes[m]}.nii.gz" for m in MODALITIES}
    return images, folder / f"{case_id}{suffixes['seg']}.nii.gz"


def case_ids(layout: str, n: int, start: int = 1) -> list[str]:
    """Case names as each challenge spells them."""
    fmt = {
        "brats2020": "BraTS20_Training_{:03d}",
        "brats2021": "BraTS2021_{:05d}",
        "brats2023": "BraTS-GLI-{:05d}-000",
        "msd": "BRATS_{:03d}",
    }[layout]
    return [fmt.format(i) for i in range(start, start + n)]


def write_case_files(
    root: str | os.PathLike,
    layout: str,
    case_id: str,
    images: dict[str, np.ndarray],
    labels: np.ndarray | None,
    affine: np.ndarray,
    *,
    image_dtype=np.int16,
) -> tuple[dict[str, Path], Path]:
    """Write a case given in *file* voxel order (canonical labels) in the naming of `layout`."""
    image_paths, seg_path = layout_paths(root, layout, case_id)

    def nifti(data: np.ndarray) -> nib.Nifti1Image:
        img = nib.Nifti1Image(data, affine)  # the file takes the array's dtype
        img.header.set_xyzt_units("mm", "sec")
        return img

    if layout == "msd":
        stacked = np.stack([images[m] for m in MSD_CHANNELS], axis=-1).astype(image_dtype)
        save_nifti(nifti(stacked), image_paths["flair"])
    else:
        for modality in MODALITIES:
            if modality in images:  # a case may lack some
                save_nifti(nifti(np.asarray(images[modality]).astype(image_dtype)), image_paths[modality])
    if labels is not None:
        save_nifti(nifti(from_canonical(labels, LAYOUT_CONVENTION[layout])), seg_path)
    return image_paths, seg_path


def detect_convention(layout: str, values: np.ndarray) -> str:
    """The label convention of a segmentation of `layout` holding `values`.

    The one detector, for a case and for a bare label file alike: BraTS 2013-2015 files are
    named like those of 2017-2021 and hold the same 1, 2, 4, but also mark non-enhancing
    tumour with 3, which later BraTS 2017-2021 files never hold.
    """
    convention = LAYOUT_CONVENTION[layout]
    if convention in ("brats2020", "brats2021") and (np.asarray(values) == 3).any():
        return "brats2015"
    return convention


def guess_convention(path: Path, values: np.ndarray | None = None) -> str:
    """The label convention of a bare label file, from the case naming or else its values."""
    stem = case_id_of(path)
    parent = path.parent.name
    if stem.startswith(("BraTS-", "BraTS2023")) or parent.startswith("BraTS-"):
        layout = "brats2023"
    elif stem.startswith(("BraTS20", "BraTS2021")) or parent.startswith(("BraTS20", "BraTS2021")):
        layout = "brats2020"
    elif stem.startswith("BRATS_") or parent == "labelsTr":
        layout = "msd"
    elif values is not None and (np.asarray(values) == 4).any():  # 4: enhancing in BraTS 2013-2021 only
        layout = "brats2020"
    else:
        return "canonical"
    return detect_convention(layout, values) if values is not None else LAYOUT_CONVENTION[layout]


def read_labels(path: str | os.PathLike, convention: str | None = None) -> tuple[np.ndarray, CaseSource]:
    """A label volume (a case folder's segmentation or a bare file) -> canonical display labels."""
    path = Path(path)
    layout = None
    if path.is_dir():
        files = find_case(path)
        if files.seg is None:
            raise NapariUnetError(f"{path}: the case has no segmentation file")
        path, layout = files.seg, files.layout
    data, img = _load(path)
    data = _check_3d(data, path)
    if not convention:  # a case folder's layout is known; a bare file's is guessed from its name
        convention = detect_convention(layout, data) if layout else guess_convention(path, data)
    layout = {"canonical": "single"}.get(convention, convention)
    source = make_source(layout, case_id_of(path), path, img, label_dtype=str(np.dtype(img.get_data_dtype())))
    return source.to_display(to_canonical(data, convention, str(path))), source
