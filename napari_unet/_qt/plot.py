"""A tiny live loss plot drawn with QPainter (no plotting library needed in the dock)."""

from __future__ import annotations

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget


class LossPlot(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.values: list[float] = []
        self.setMinimumHeight(80)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setToolTip("fine-tuning loss per step")

    def clear(self) -> None:
        self.values = []
        self.update()

    def add(self, value: float) -> None:
        self.values.append(float(value))
        self.update()

    def paintEvent(self, event):  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.fillRect(self.rect(), QColor(38, 41, 48))
        painter.setPen(QColor(150, 150, 150))
        if not self.values:
            painter.drawText(self.rect(), Qt.AlignCenter, "fine-tuning loss (per step)")
            return
        lo, hi = min(self.values), max(self.values)
        span = (hi - lo) or 1.0
        n = max(2, len(self.values))
        # Axes: loss upwards on the left (its range written beside it), steps along the bottom.
        rect = self.rect().adjusted(44, 6, -6, -16)
        painter.drawLine(rect.bottomLeft(), rect.topLeft())
        painter.drawLine(rect.bottomLeft(), rect.bottomRight())
        painter.drawText(2, rect.top() + 10, f"{hi:.3f}")
        painter.drawText(2, rect.bottom(), f"{lo:.3f}")
        painter.drawText(rect.left(), self.height() - 3, "step 1")
        painter.drawText(rect.right() - 60, self.height() - 3, f"step {len(self.values)}")
        points = QPolygonF([
            QPointF(rect.left() + rect.width() * i / (n - 1), rect.bottom() - rect.height() * (v - lo) / span)
            for i, v in enumerate(self.values)
        ])
        painter.setPen(QPen(QColor(255, 200, 60), 1.5))
        painter.drawPolyline(points)
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(rect.left() + 6, rect.top() + 10, f"loss {self.values[-1]:.3f}")
