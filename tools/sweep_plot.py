"""Plot a policy sweep: output tok/s against P99 TTFT and P99 ITL (client side), one line per
configuration, from a summary JSON such as docs/figures/policy_sweep.json.

    python tools/sweep_plot.py docs/figures/policy_sweep.json docs/figures/policy_sweep.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.loads(open(src).read())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    for name, rows in data["configs"].items():
        tok = [r[1] for r in rows]
        for ax, col in zip(axes, (2, 4), strict=True):
            ax.plot(tok, [r[col] for r in rows], marker="o", label=name)
            for r in rows:
                ax.annotate(f"{r[0]:g}/s", (r[1], r[col]), fontsize=6, alpha=0.6)
    objectives = data.get("objectives", [[200, 25]])  # (TTFT, ITL) ms pairs, drawn as dotted lines
    for i, (ax, title) in enumerate(zip(axes, ("P99 time to first token (client)", "P99 inter-token latency (client)"),
                                        strict=True)):
        ax.set_title(title)
        ax.set_xlabel("output tok/s")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        for pair in objectives:
            ax.axhline(pair[i], color="grey", linestyle=":", linewidth=1)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
