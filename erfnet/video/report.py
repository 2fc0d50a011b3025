"""The report of the video path: the per-stage table of one ``run_video``."""

from __future__ import annotations

from typing import Any


def format_report(report: dict[str, Any]) -> str:
    """The per-stage table and the end-to-end FPS of one ``run_video`` report."""
    size = report["frame_size"] or ["?", "?"]
    net = report["network_size"] or size
    lines = [
        f"{report['mode']} {report['backend']} on {report['device']}: {report['frames']} frames "
        f"of {size[0]}x{size[1]} (network {net[0]}x{net[1]})"
        + (f", {report['dropped']} dropped to stay live" if report["dropped"] else ""),
        f"{'stage':<12} {'mean ms':>9} {'share of wall':>14}",
    ]
    for name, s in report["stages"].items():
        lines.append(f"{name:<12} {s['mean_ms']:>9.1f} {100 * s['share']:>13.1f}%")
    lines.append(
        f"{'end to end':<12} {1e3 * report['wall_s'] / max(report['frames'], 1):>9.1f} "
        f"{100.0:>13.1f}%   {report['fps']:.2f} FPS"
    )
    return "\n".join(lines + report.get("notes", []))
