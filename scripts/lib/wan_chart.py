#!/usr/bin/env python3
"""SVG chart of bench-wan.sh's CSV: % of link against loss, one panel per (rate, RTT).

    wan_chart.py bench/out/wan.csv bench/wan-link-share.svg

Each panel plots every tool (shardsend per congestion controller, scp, rsync) as a line over
the loss cases in the order they were measured (0, 0.1%, 1%, then bursty where present).
Plain SVG, no plotting library, so the chart renders anywhere the markdown does.
"""
import csv
import sys
from collections import OrderedDict

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def main(src, dst):
    rows = list(csv.DictReader(open(src)))
    panels = OrderedDict()
    losses = []
    tools = []
    for r in rows:
        panels.setdefault((r["rate"], r["rtt_ms"]), []).append(r)
        if r["loss"] not in losses:
            losses.append(r["loss"])
        tool = r["tool"] + (f" ({r['congestion']})" if r["congestion"] else "")
        if tool not in tools:
            tools.append(tool)
    rtts = list(OrderedDict.fromkeys(k[1] for k in panels))
    rates = list(OrderedDict.fromkeys(k[0] for k in panels))
    pw, ph, ml, mt = 260, 190, 50, 40
    width = ml + len(rtts) * (pw + 30) + 170
    height = mt + len(rates) * (ph + 60) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{ml}" y="20" font-size="14">% of link rate against loss (linkemu)</text>']
    for ri, rate in enumerate(rates):
        for ti, rtt in enumerate(rtts):
            cell = panels.get((rate, rtt))
            if not cell:
                continue
            x0 = ml + ti * (pw + 30)
            y0 = mt + ri * (ph + 60)
            cell_losses = [l for l in losses if any(r["loss"] == l for r in cell)]
            out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
            out.append(f'<text x="{x0 + 4}" y="{y0 - 6}">{rate}bit/s, RTT {rtt} ms</text>')
            for pct in (0, 25, 50, 75, 100):
                y = y0 + ph - ph * pct / 100
                out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y}" y2="{y}" stroke="#eee"/>')
                out.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{pct}%</text>')
            def xpos(i):
                return x0 + 20 + i * (pw - 40) / max(len(cell_losses) - 1, 1)
            for i, l in enumerate(cell_losses):
                label = "bursty" if l == "bursty" else f"{l}%"
                out.append(f'<text x="{xpos(i)}" y="{y0 + ph + 14}" text-anchor="middle">{label}</text>')
            for k, tool in enumerate(tools):
                pts = []
                for i, l in enumerate(cell_losses):
                    for r in cell:
                        name = r["tool"] + (f" ({r['congestion']})" if r["congestion"] else "")
                        if name == tool and r["loss"] == l:
                            pct = min(float(r["pct_link"]), 100.0)
                            pts.append((xpos(i), y0 + ph - ph * pct / 100))
                colour = COLOURS[k % len(COLOURS)]
                if len(pts) > 1:
                    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                    out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
                for x, y in pts:
                    out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
    lx = ml + len(rtts) * (pw + 30)
    for k, tool in enumerate(tools):
        y = mt + 10 + k * 16
        out.append(f'<rect x="{lx}" y="{y - 8}" width="12" height="8" fill="{COLOURS[k % len(COLOURS)]}"/>')
        out.append(f'<text x="{lx + 16}" y="{y}">{tool}</text>')
    out.append("</svg>")
    open(dst, "w").write("\n".join(out) + "\n")
    print(f"chart written to {dst}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
