"""`dvc plots show` renders offline: the project's HTML template loads Vega from plots/vendor/, not a CDN.

A throwaway DVC project (no git) gets a dvclive-style TSV plot, the repository's plots/ folder and the repository's
`plots.html_template` setting; `dvc plots show` writes dvc_plots/index.html, which headless Chromium screenshots with
networking cut off (every request goes to a dead proxy). The page counts as rendered when the screenshot has many
non-white pixels and the plot's line colour; DVC's default template (CDN scripts) gives a white page under the same
conditions, which the test checks as its negative control.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
LINE_RGB = (0x94, 0x5D, 0xD6)  # the first colour dvc-render gives a line (dvc_render.vega OPTIONAL_ANCHOR_RANGES)

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (needed to render dvc_plots/index.html; `make test` installs it best-effort, "
    "or: apt-get install -y --no-install-recommends chromium)",
)


def dvc(project: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], check=False, cwd=project, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def screenshot(page: Path, png: Path, profile: Path) -> None:
    """Headless Chromium, offline: a dead proxy for every request and no DNS; file:// pages still load."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=5000",
        "--window-size=1000,800",
        f"--screenshot={png}",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"no screenshot (rc {proc.returncode}):\n{proc.stderr[-3000:]}"


def read_png(path: Path) -> tuple[int, list[bytearray]]:
    """(bytes per pixel, rows) of an 8-bit non-interlaced RGB/RGBA PNG, as headless Chromium writes them."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, f"unsupported PNG {header}"
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(b"".join(idat))
    prev, rows = bytearray(stride), []
    for y in range(height):  # undo the per-row filters (PNG spec 9.2)
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:  # Sub
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:  # Up
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif kind == 3:  # Average
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:  # Paeth
            for i in range(stride):
                a, b = (line[i - bpp] if i >= bpp else 0), prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(line)
        prev = line
    return bpp, rows


def ink(png: Path) -> tuple[int, int]:
    """(non-white pixels, pixels of the plot's line colour) in a screenshot."""
    bpp, rows = read_png(png)
    non_white = line = 0
    for row in rows:
        for i in range(0, len(row), bpp):
            r, g, b = row[i], row[i + 1], row[i + 2]
            if r < 235 or g < 235 or b < 235:
                non_white += 1
                if abs(r - LINE_RGB[0]) < 40 and abs(g - LINE_RGB[1]) < 40 and abs(b - LINE_RGB[2]) < 40:
                    line += 1
    return non_white, line


def test_read_png_undoes_every_filter():
    """The decoder against zlib-built PNGs using each filter type on known pixels."""
    import tempfile

    width, rows = 3, [bytes([10, 20, 30, 200, 100, 0, 255, 255, 255]), bytes([1, 2, 3, 4, 5, 6, 7, 8, 9])]
    for kind in range(5):
        filtered, prev = b"", bytes(9)
        for row in rows:
            out = bytearray(9)
            for i in range(9):
                a, b = (row[i - 3] if i >= 3 else 0), prev[i]
                c = prev[i - 3] if i >= 3 else 0
                p = a + b - c
                pred = [
                    0,
                    a,
                    b,
                    (a + b) >> 1,
                    a
                    if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c)
                    else b
                    if abs(p - b) <= abs(p - c)
                    else c,
                ][kind]
                out[i] = (row[i] - pred) & 0xFF
            filtered += bytes([kind]) + bytes(out)
            prev = row

        def chunk(tag: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

        png = (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, 2, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(filtered))
            + chunk(b"IEND", b"")
        )
        with tempfile.NamedTemporaryFile(suffix=".png") as f:
            f.write(png)
            f.flush()
            assert read_png(Path(f.name)) == (3, [bytearray(r) for r in rows]), f"filter {kind}"


@needs_chromium
def test_dvc_plots_show_renders_offline(tmp_path):
    from configobj import ConfigObj

    template = ConfigObj(str(REPO / ".dvc" / "config")).get("plots", {}).get("html_template")
    assert template, "the project's .dvc/config sets no plots.html_template: `dvc plots show` would use the CDN"
    # DVC resolves a relative plots.html_template against .dvc/ (dvc/commands/plots.py)
    assert (REPO / ".dvc" / template).resolve() == REPO / "plots" / "template.html", template

    project = tmp_path / "project"
    shutil.copytree(REPO / "plots", project / "plots")
    (project / ".dvc").mkdir()
    (project / ".dvc" / "config").write_text(
        f"[core]\n    no_scm = True\n    analytics = false\n    site_cache_dir = {tmp_path / 'site_cache'}\n"
    )
    metrics = project / "dvclive" / "plots" / "metrics"
    metrics.mkdir(parents=True)
    (metrics / "loss.tsv").write_text("step\tloss\n" + "".join(f"{s}\t{2.0 / (1 + s):.4f}\n" for s in range(30)))
    (project / "dvc.yaml").write_text("plots:\n  - dvclive/plots/metrics:\n      x: step\n")

    # Negative control: DVC's default template, same page, same offline browser.
    dvc(project, "plots", "show", "-o", "default_plots")
    default_page = project / "default_plots" / "index.html"
    assert "https://cdn.jsdelivr.net/npm/vega" in default_page.read_text()

    with (project / ".dvc" / "config").open("a") as f:
        f.write(f"[plots]\n    html_template = {template}\n")
    out = dvc(project, "plots", "show")
    page = project / "dvc_plots" / "index.html"
    assert page.as_uri() in out, out
    html = page.read_text()
    scripts = re.findall(r'<script[^>]*\ssrc="([^"]+)"', html)
    assert len(scripts) == 3 and not [s for s in scripts if "//" in s], scripts
    missing = [s for s in scripts if not (page.parent / s).is_file()]
    assert not missing, f"scripts not found relative to {page}: {missing}"

    shot, default_shot = tmp_path / "plots.png", tmp_path / "default.png"
    screenshot(page, shot, tmp_path / "profile")
    screenshot(default_page, default_shot, tmp_path / "profile-default")
    non_white, line = ink(shot)
    default_non_white, default_line = ink(default_shot)
    # Title, axes, grid, legend and the loss curve: about 10,000 pixels (860 of the line colour) in the
    # 1000x800 shot; a blank page has none.
    assert non_white > 3000 and line > 150, (non_white, line)
    assert default_non_white < 100 and default_line == 0, (
        "DVC's default (CDN) page rendered offline, so this test no longer shows the network is cut",
        default_non_white,
        default_line,
    )
