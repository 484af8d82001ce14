#!/usr/bin/env bash
# Reproduces the README's accuracy table: the bundled model on 300 held-out regions, one `pdlm-ros eval` per row.
# Usage: [CHECKPOINT=DIR] scripts/eval_table.sh [OUT_DIR]   (default out/eval, the bundled model); prints a markdown
# table, then the shape confusion matrix of the first row.
set -euo pipefail
out=${1:-out/eval}
mkdir -p "$out"
# mode:region-kind:scene-set
runs="parallel:mask:heldout sequential:mask:heldout threshold:mask:heldout nomask:mask:heldout parallel:box:heldout
      parallel:mask:shift parallel:box:shift"
for run in $runs; do
  IFS=: read -r mode kind scenes <<<"$run"
  pdlm-ros eval ${CHECKPOINT:+--checkpoint "$CHECKPOINT"} --regions 300 --mode "$mode" --region-kind "$kind" --scenes "$scenes" \
      --json "$out/$mode-$kind-$scenes.json" >/dev/null
done
python3 - "$out" "$runs" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| scenes | regions given as | mode | Pos | Neg | Avg | shape | colour | pattern | size | NFE/frame | TPF | s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
runs = sys.argv[2].split()
for run in runs:
    mode, kind, scenes = run.split(":")
    d = json.loads((out / f"{mode}-{kind}-{scenes}.json").read_text())
    a = d["per_attribute"]
    print(f"| {scenes} | {kind} | {mode} | {d['pos']:.1f} | {d['neg']:.1f} | {d['avg']:.1f} | {a['shape']:.1f} "
          f"| {a['color']:.1f} | {a['pattern']:.1f} | {a['size']:.1f} | {d['nfe']:.1f} | {d['tpf']:.2f} "
          f"| {d['caption_seconds']:.0f} |")
mode, kind, scenes = runs[0].split(":")
conf = json.loads((out / f"{mode}-{kind}-{scenes}.json").read_text())["confusion"]["shape"]
cols = list(conf) + ["(none)", "(several)"]
print(f"\nshape confusion, {scenes} {kind} {mode} (rows: true shape; columns: the shape the caption named)\n")
print("| true | " + " | ".join(cols) + " |")
print("|---|" + "---|" * len(cols))
for shape, row in conf.items():
    print(f"| {shape} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
PY
