"""A tiny per-slice confidence bar plot painted with QPainter (no plotting library needed)."""
from __future__ import annotations

import numpy as np
from qtpy.QtCore import QRectF, Qt, Signal
from qtpy.QtGui import QColor, QMouseEvent, QPainter, QPaintEvent, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

#: bars below this confidence are drawn in orange (review them first)
UNCERTAIN_BELOW = 0.5


class ConfidencePlot(QWidget):
    """One bar per slice: height = confidence (0..1); grey = not labelled, green/orange = labelled.

    Click a bar to emit :attr:`slice_clicked` with its slice index; the current slice is outlined.
    """

    slice_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.confidence = np.zeros(0, np.float32)
        self.present = np.zeros(0, bool)
        self.current: int | None = None
        self.setMinimumHeight(70)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Confidence per slice (click a bar to go to that slice)")

    def set_data(self, confidence: np.ndarray | None, present: np.ndarray | None = None) -> None:
        """Show ``confidence`` (NaN = slice not looked at) and which slices are labelled."""
        conf = np.zeros(0, np.float32) if confidence is None else np.asarray(confidence, np.float32)
        self.confidence = conf
        self.present = np.ones(conf.shape, bool) if present is None else np.asarray(present, bool)
        self.update()

    def set_current(self, k: int | None) -> None:
        if k != self.current:
            self.current = k
            self.update()

    def _bar_width(self) -> float:
        return self.width() / max(len(self.confidence), 1)

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt API)
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(38, 41, 48))
        n = len(self.confidence)
        h = self.height() - 2
        if n:
            w = self._bar_width()
            for k, c in enumerate(self.confidence):
                if not np.isfinite(c):
                    continue
                if not self.present[k]:
                    col = QColor(110, 110, 110)
                else:
                    col = QColor(230, 140, 30) if c < UNCERTAIN_BELOW else QColor(60, 180, 90)
                bh = max(1.0, float(c) * h)
                p.fillRect(QRectF(k * w + 0.5, h - bh + 1, max(w - 1.0, 1.0), bh), col)
            if self.current is not None and 0 <= self.current < n:
                p.setPen(QPen(QColor(255, 255, 255), 1))
                p.drawRect(QRectF(self.current * w, 0, max(w - 1.0, 1.0), h + 1))
            p.setPen(QPen(QColor(200, 200, 200, 120), 1, Qt.PenStyle.DashLine))
            y = h - UNCERTAIN_BELOW * h + 1
            p.drawLine(0, int(y), self.width(), int(y))
        else:
            p.setPen(QColor(160, 160, 160))
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "no result yet")
        p.end()

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802 (Qt API)
        if len(self.confidence):
            x = event.position().x() if hasattr(event, "position") else event.x()
            k = int(np.clip(x // self._bar_width(), 0, len(self.confidence) - 1))
            self.slice_clicked.emit(k)
        super().mousePressEvent(event)
