#!/usr/bin/env bash
# Reproduces the README's accuracy table: the bundled model on 300 held-out regions, one `pdlm-ros eval` per row.
# Usage: scripts/eval_table.sh [OUT_DIR]   (default out/eval); prints a markdown table.
set -euo pipefail
out=${1:-out/eval}
mkdir -p "$out"
runs="parallel:mask sequential:mask threshold:mask nomask:mask parallel:box"
for run in $runs; do
  mode=${run%:*}; kind=${run#*:}
  pdlm-ros eval --regions 300 --mode "$mode" --region-kind "$kind" --json "$out/$mode-$kind.json" >/dev/null
done
python3 - "$out" "$runs" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| regions given as | mode | Pos | Neg | Avg | shape | colour | pattern | size | NFE/frame | TPF | s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for run in sys.argv[2].split():
        mode, kind = run.split(":")
        d = json.loads((out / f"{mode}-{kind}.json").read_text())
        a = d["per_attribute"]
        print(f"| {kind} | {mode} | {d['pos']:.1f} | {d['neg']:.1f} | {d['avg']:.1f} | {a['shape']:.1f} | {a['color']:.1f} "
              f"| {a['pattern']:.1f} | {a['size']:.1f} | {d['nfe']:.1f} | {d['tpf']:.2f} | {d['caption_seconds']:.0f} |")
PY
