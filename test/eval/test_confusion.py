"""Per-attribute confusion matrices of `pdlm-ros eval`."""

import json
import subprocess
import sys

from pdlm_ros.eval.harness import NONE, SEVERAL, confusion_matrices


def test_confusion_counts_named_values():
    truth = {"shape": "circle", "color": "red", "pattern": "solid", "size": "large"}
    pairs = [(truth, "a large solid red circle"), (truth, "a large solid red cross"), (truth, ""),
             (truth, "a large solid red star hexagon")]
    m = confusion_matrices(pairs)
    assert m["shape"]["circle"] == {"circle": 1, "cross": 1, NONE: 1, SEVERAL: 1}
    assert m["color"]["red"] == {"red": 3, NONE: 1}
    assert m["shape"]["square"] == {}  # every value has a row, seen or not


def test_eval_cli_reports_confusion_on_the_style_shift_set(tmp_path):
    out = tmp_path / "shift.json"
    proc = subprocess.run([sys.executable, "-m", "pdlm_ros.cli", "eval", "--preset", "tiny", "--regions", "8",
                           "--scenes", "shift:jpeg", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    assert d["dataset"] == "synthetic-shift-jpeg" and d["regions"] == 8
    assert sum(sum(row.values()) for row in d["confusion"]["shape"].values()) == 8
    assert "shape: true value (rows)" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "pdlm_ros.cli", "eval", "--preset", "tiny", "--scenes", "shift:ink"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "--scenes must be heldout, shift or shift:KIND" in bad.stderr
    assert "Traceback" not in bad.stderr
