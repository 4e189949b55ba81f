"""The per-character unit heatmap, as in Radford et al. 2017's pictures: a text with each character
coloured by one cell unit's value after the model has read it.

The text is read as the featuriser reads it (inference.encode: cleaned, after a document end), and
the drawing shows the cleaned text. A character of several UTF-8 bytes takes the value after its
last byte. Colours are diverging and centred at 0. Both visualize (a text given) and generate
--heatmap (a sampled text) draw with it, so it lives here, a floor below both CLIs.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import tensorflow as tf
from absl import logging

from horovod_mlstm import files
from horovod_mlstm.inference import encode
from horovod_mlstm.records import DOC_END

MAX_CHARS = 5000  # beyond this the figure gets too tall to look at (and rendering slow)
FONT = "DejaVu Sans Mono"  # ships with matplotlib, so every machine draws the same figure
VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}  # whitespace that must stay visible to carry its colour


class HeatmapError(Exception):
    """Bad input for a heatmap; the message names the flag or file."""


def encode_text(text: str, source: str) -> bytes:
    """inference.encode(text), with one error naming `source` for text that is not valid UTF-8.

    absl hands over command-line bytes that are not UTF-8 as lone surrogates (U+DC80..U+DCFF).
    They are caught here, before inference.encode, which replaces them (a featurised text must not
    stop a whole file) and would draw a "?" the user never typed.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        what = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
        raise HeatmapError(f"{source} is not valid UTF-8 ({what} at character {e.start})") from None
    return encode(text)


def unit_trace(model, data: bytes, unit: int) -> np.ndarray:
    """Cell state of `unit` after each byte of `data`, read from a zero state: one float per byte."""
    n = model.config.hidden_size
    step = tf.function(lambda byte, h, c: model(tf.reshape(byte, [1, 1]), (h, c))[1],
                       input_signature=[tf.TensorSpec([], tf.int32), tf.TensorSpec([1, n], tf.float32),
                                        tf.TensorSpec([1, n], tf.float32)])
    h, c = model.zero_state(1)
    values = np.empty(len(data), np.float32)
    for t, byte in enumerate(data):
        h, c = step(tf.constant(byte, tf.int32), h, c)
        values[t] = c[0, unit]
    return values


def per_character(data: bytes, values: np.ndarray) -> tuple[str, np.ndarray]:
    """The decoded text and, per character, the value after its last byte."""
    text = data.decode("utf-8")
    last_bytes = np.cumsum([len(ch.encode("utf-8")) for ch in text], dtype=np.int64) - 1
    return text, values[last_bytes]


def wrap(text: str, width: int) -> list[list[int]]:
    """Character indices of each drawn line: breaks after spaces, inside words longer than a line, after newlines."""
    lines, line = [], []
    for token in re.finditer(r"\n|[^ \n]+ *| +", text):  # a word with its trailing spaces, or a newline
        if line and len(line) + len(token.group().rstrip("\n")) > width:
            lines.append(line)
            line = []
        for index in range(token.start(), token.end()):
            if len(line) == width:
                lines.append(line)
                line = []
            line.append(index)
        if token.group() == "\n":
            lines.append(line)
            line = []
    return lines + [line] if line else lines


def draw(text: str, values: np.ndarray, path: str, label: str, title: str = "", width: int = 80) -> None:
    """Draws `text` with character i on a background coloured by values[i] and writes a PNG to `path`.

    The colour scale is symmetric around 0 (red positive, blue negative, white 0), with a colour
    bar. The PNG is written beside `path` and renamed, so a failure leaves no partial file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = wrap(text, width)
    width = max(len(line) for line in lines)  # a short text gets a narrow picture
    grid = np.full((len(lines), width), np.nan)
    for row, line in enumerate(lines):
        grid[row, :len(line)] = values[line]
    limit = float(np.abs(values).max()) or 1.0
    # RdBu without its darkest ends: the strongest colours stay light enough to read text on.
    cmap = matplotlib.colors.ListedColormap(matplotlib.colormaps["RdBu_r"](np.linspace(0.08, 0.92, 256)))
    cmap.set_bad("white")
    norm = matplotlib.colors.Normalize(-limit, limit)

    # Layout in inches: title, text lines, colour bar with its label; the cell fits a 12 pt mono glyph.
    font_size, cell_w, cell_h = 12, 0.105, 0.24
    left, top, gap, bar_h, bottom = 0.3, 0.45, 0.3, 0.16, 0.5
    text_w, text_h = width * cell_w, len(lines) * cell_h
    bar_w = min(max(text_w, 4.0), 5.0)
    fig_w, fig_h = max(text_w, bar_w) + 2 * left, top + text_h + gap + bar_h + bottom
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes([left / fig_w, (bottom + bar_h + gap) / fig_h, text_w / fig_w, text_h / fig_h])
    image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest",
                      extent=(0, width, len(lines), 0))
    for row, line in enumerate(lines):
        for column, index in enumerate(line):
            r, g, b, _ = cmap(norm(values[index]))
            ax.text(column + 0.5, row + 0.52, VISIBLE.get(text[index], text[index]), ha="center", va="center",
                    fontsize=font_size, family=FONT,
                    color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=11, loc="left")
    bar_ax = fig.add_axes([left / fig_w, bottom / fig_h, bar_w / fig_w, bar_h / fig_h])
    fig.colorbar(image, cax=bar_ax, orientation="horizontal").set_label(label, fontsize=10)
    try:
        with warnings.catch_warnings(record=True) as caught, files.replace_whole(path, "wb") as f:
            warnings.simplefilter("always")
            fig.savefig(f, dpi=110, format="png", bbox_inches="tight", pad_inches=0.15)  # a long title fits
        missing = {str(w.message).split("(")[0].strip() for w in caught if "missing from" in str(w.message)}
        if missing:
            logging.warning("%d characters have no glyph in %s and show as boxes", len(missing), FONT)
    except OSError as e:
        raise HeatmapError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def write_heatmap(model, data: bytes, unit: int, path: str, sign: float = 1.0, title: str = "",
                  width: int = 80) -> np.ndarray:
    """Reads `data` (bytes as the model reads them, starting with the document end) and draws unit's heatmap.

    Returns the per-character values drawn (times `sign`); the leading document end is read, not drawn.
    """
    skip = len(DOC_END.decode("utf-8")) if data.startswith(DOC_END) else 0
    if len(data) == skip:
        raise HeatmapError("nothing to draw: the text is empty")
    values = unit_trace(model, data, unit) * sign
    text, per_char = per_character(data, values)
    label = f"cell state of unit {unit}" if sign > 0 else f"cell state of unit {unit} × −1 (warm = positive class)"
    draw(text[skip:], per_char[skip:], path, label, title, width)
    return per_char[skip:]


def check_output(path: str, what: str) -> None:
    """Before any work: a .png path that can be written (files.NotWritable otherwise)."""
    if not path.lower().endswith(".png"):
        raise HeatmapError(f"{what} {path} must end in .png (the heatmap is a PNG)")
    files.check_writable(path, what)


def check_length(characters: int, what: str) -> None:
    if characters > MAX_CHARS:
        raise HeatmapError(f"{what} is {characters} characters; a heatmap draws at most {MAX_CHARS}")
