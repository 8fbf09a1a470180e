"""The annotation widget's layout: each panel lays out its controls and connects them to the
widget's methods; it decides nothing (the widget and its Qt-free session do)."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_unet._qt.case_list import case_list_panel
from napari_unet._qt.plot import LossPlot
from napari_unet._qt.tools_panel import correct_panel
from napari_unet.labels import BACKGROUND, EDEMA, ENHANCING, LABEL_COLORS, LABEL_NAMES, NECROTIC

SHIPPED_MODEL_ITEM = "shipped default model"  # the model menu's entry for the packaged model
MODEL_NAME_CHARS = 18  # the model menu is this wide whatever path it holds: the canvas keeps its room


class PathLabel(QLabel):
    """Shows its text with a break opportunity after each path separator, so a path wraps over
    lines rather than being cut; `text()` is the text as it was set."""

    def __init__(self, text: str = "", parent=None):
        super().__init__(parent)
        self.setText(text)

    def setText(self, text: str) -> None:  # noqa: N802 (Qt's name)
        self._plain = text
        super().setText(text.replace("/", "/\u200b").replace("\\", "\\\u200b"))

    def text(self) -> str:
        return self._plain


def wrapping_label(text: str = "") -> QLabel:
    """A label that wraps and never widens the dock: a long path breaks over lines instead."""
    label = PathLabel(text)
    label.setWordWrap(True)
    policy = label.sizePolicy()  # (keeps the height-for-width that word wrap set)
    policy.setHorizontalPolicy(QSizePolicy.Ignored)
    label.setSizePolicy(policy)
    return label


def with_button(field: QWidget, text: str, slot) -> QHBoxLayout:
    """A form row: a field that stretches and a small button beside it."""
    button = QPushButton(text)
    button.clicked.connect(slot)
    row = QHBoxLayout()
    row.addWidget(field, 1)
    row.addWidget(button)
    return row


def model_panel(w) -> QGroupBox:
    """The model, the device and flip averaging."""
    box = QGroupBox("Model")
    form = QFormLayout(box)
    w.model_combo = QComboBox()
    w.model_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
    w.model_combo.setMinimumContentsLength(MODEL_NAME_CHARS)
    w.model_combo.addItem(SHIPPED_MODEL_ITEM)  # no data: the packaged model
    form.addRow("model", with_button(w.model_combo, "File…", w._browse_model))
    w.model_combo.currentIndexChanged.connect(w._model_changed)
    w.device_combo = QComboBox()
    w.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
    w.tta_check = QCheckBox("flip averaging")
    w.tta_check.setToolTip("average the predictions of the image and its flips: steadier, 4x slower")
    row = QHBoxLayout()
    row.addWidget(w.device_combo)
    row.addWidget(w.tta_check, 1)
    form.addRow("device", row)
    return box


def propose_panel(w) -> QGroupBox:
    """Propose the whole volume or the slice on screen; the uncertainty layer."""
    box = QGroupBox("Propose")
    col = QVBoxLayout(box)
    row = QHBoxLayout()
    w.propose_volume_btn = QPushButton("Whole volume")
    w.propose_slice_btn = QPushButton("This slice")
    w.propose_volume_btn.clicked.connect(lambda: w.propose(current_slice=False))
    w.propose_slice_btn.clicked.connect(lambda: w.propose(current_slice=True))
    row.addWidget(w.propose_volume_btn)
    row.addWidget(w.propose_slice_btn)
    col.addLayout(row)
    w.show_uncertainty = QCheckBox("show uncertainty layer")
    w.show_uncertainty.toggled.connect(w._toggle_uncertainty)
    col.addWidget(w.show_uncertainty)
    return box


def paint_panel(w) -> QGroupBox:
    """One button per label, in its colour; the one painting with is shown pressed; the volumes."""
    box = QGroupBox("Paint (Alt-0 … Alt-3)")
    col = QVBoxLayout(box)
    row = QHBoxLayout()
    w.label_buttons = {}
    for value in (NECROTIC, EDEMA, ENHANCING, BACKGROUND):
        name = "eraser" if value == BACKGROUND else LABEL_NAMES[value]
        button = QPushButton(f"{value} {name.split()[0]}")  # "3 enhancing": four fit in a narrow dock
        button.setToolTip(f"paint {name} (Alt-{value})" if value != BACKGROUND else "erase (Alt-0)")
        button.setCheckable(True)
        if value in LABEL_COLORS:
            r, g, b, _ = (int(255 * c) for c in LABEL_COLORS[value])
            button.setStyleSheet(f"border-left: 6px solid rgb({r},{g},{b});")
        button.clicked.connect(lambda _=False, v=value: w.select_label(v))
        row.addWidget(button)
        w.label_buttons[value] = button
    col.addLayout(row)
    w.volumes_label = wrapping_label("")  # the legend: each label's colour and volume, as painted
    w.volumes_label.setTextFormat(Qt.RichText)
    col.addWidget(w.volumes_label)
    row = QHBoxLayout()
    contrast_btn = QPushButton("Next contrast (Shift-C)")
    contrast_btn.setToolTip("show the case's next contrast under the annotation")
    contrast_btn.clicked.connect(lambda _=False: w.review.cycle_contrast())
    w.grid_btn = QPushButton("Grid (Shift-G)")
    w.grid_btn.setCheckable(True)
    w.grid_btn.setToolTip("every contrast side by side, the annotation over each; paint in any")
    w.grid_btn.clicked.connect(lambda _=False: w.grid.toggle())
    row.addWidget(contrast_btn)
    row.addWidget(w.grid_btn)
    col.addLayout(row)
    return box


def review_panel(w) -> QGroupBox:
    """The slice on screen, Mark reviewed, Review next, the reviewed slices."""
    box = QGroupBox("Review")
    col = QVBoxLayout(box)
    w.slice_label = wrapping_label("no case open")
    col.addWidget(w.slice_label)
    row = QHBoxLayout()
    w.reviewed_btn = QPushButton("Mark reviewed (Shift-R)")
    w.reviewed_btn.clicked.connect(lambda: w.toggle_reviewed())
    w.next_btn = QPushButton("Review next (Shift-N)")
    w.next_btn.setToolTip("jump to the unreviewed slice where the model is least sure")
    w.next_btn.clicked.connect(lambda: w.review_next())
    row.addWidget(w.reviewed_btn)
    row.addWidget(w.next_btn)
    col.addLayout(row)
    w.reviewed_list = QListWidget()
    w.reviewed_list.setMinimumHeight(2 * w.reviewed_list.fontMetrics().height() + 8)  # the rest of the dock's height
    w.reviewed_list.itemClicked.connect(lambda item: w.go_to_slice(int(item.data(Qt.UserRole))))
    w.reviewed_list.setToolTip("the reviewed slices: click one to go to it")  # (no caption line: room for rows)
    col.addWidget(w.reviewed_list)
    return box


def store_panel(w) -> QGroupBox:
    """The corrections store, fine-tuning and its loss plot."""
    box = QGroupBox("Corrections store and fine-tuning")
    form = QFormLayout(box)
    w.store_edit = QLineEdit()
    w.store_edit.setPlaceholderText("folder for corrections")
    w.store_edit.editingFinished.connect(lambda: w.set_store(w.store_edit.text()))
    w.store_edit.textChanged.connect(w.store_edit.setToolTip)  # the whole path, when the field is narrower
    form.addRow("store", with_button(w.store_edit, "…", w._browse_store))
    w.finetune_btn = QPushButton("Fine-tune on corrections")
    w.finetune_btn.clicked.connect(lambda: w.finetune())
    form.addRow(w.finetune_btn)
    w.loss_plot = LossPlot()
    form.addRow(w.loss_plot)
    return box


def progress_and_status(w, layout: QVBoxLayout) -> None:
    """The task's progress bar and Cancel, the status line and the last save."""
    row = QHBoxLayout()
    w.progress_bar = QProgressBar()
    w.progress_bar.setTextVisible(True)
    w.progress_bar.setFormat("")
    w.cancel_btn = QPushButton("Cancel")
    w.cancel_btn.setEnabled(False)
    w.cancel_btn.clicked.connect(w.cancel)
    row.addWidget(w.progress_bar, 1)
    row.addWidget(w.cancel_btn)
    layout.addLayout(row)
    w.status = wrapping_label()
    layout.addWidget(w.status)
    w.save_label = wrapping_label()  # autosaves report here, so they never hide the last action's result
    w.save_label.setStyleSheet("color: gray;")
    layout.addWidget(w.save_label)


class _PanelsArea(QScrollArea):
    """Scrolls up and down only, and asks for the width its panels need beside the scroll bar
    (asked again whenever a panel's content changes): nothing is cut at the right."""

    def _width(self, hint) -> int:
        inner = self.widget()
        margins = self.contentsMargins()
        return ((getattr(inner, hint)().width() if inner is not None else 0) + self.verticalScrollBar().sizeHint().width()
                + margins.left() + margins.right() + 2 * self.frameWidth())

    def minimumSizeHint(self):  # noqa: N802 (Qt's name)
        hint = super().minimumSizeHint()
        hint.setWidth(self._width("minimumSizeHint"))
        return hint

    def sizeHint(self):  # noqa: N802 (Qt's name)
        hint = super().sizeHint()
        hint.setWidth(self._width("sizeHint"))
        return hint


def build(w) -> None:
    """Lay out the panels of AnnotationWidget `w`, setting their controls on it.

    The panels scroll, the progress bar and the status under them do not: on a short screen
    (1366x768) or with a dataset open, the panels' minimum height is more than the dock has, and
    Qt would otherwise squeeze them over one another."""
    outer = QVBoxLayout(w)
    outer.setContentsMargins(0, 0, 0, 0)
    w.panels_area = _PanelsArea()
    w.panels_area.setWidgetResizable(True)
    w.panels_area.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    w.panels_area.setFrameShape(QScrollArea.NoFrame)
    panels = QWidget()
    layout = QVBoxLayout(panels)
    layout.setContentsMargins(0, 4, 0, 4)  # the scroll bar's width, taken from the margins: a 400-pixel dock
    for panel in (case_list_panel, model_panel, propose_panel, paint_panel, correct_panel, review_panel, store_panel):
        # The reviewed slices' list takes the height left over (napari adds no stretch under an
        # expanding widget).
        layout.addWidget(panel(w), 1 if panel is review_panel else 0)
    w.panels_area.setWidget(panels)
    outer.addWidget(w.panels_area, 1)
    status = QVBoxLayout()
    status.setContentsMargins(4, 0, 4, 4)
    progress_and_status(w, status)
    outer.addLayout(status)
    w.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Expanding)
