"""Per-test table from sweep.sh's junit files: summarize.py OUT_DIR [backend-world ...]
Prints counts per run and one line per test: name, then status per run (pass/skip/fail) and
the skip reason or first failure line of the last run that did not pass."""

import os
import sys
import xml.etree.ElementTree as ET


def load(path):
    res = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name")
        status, why = "pass", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = "skip" if tag == "skipped" else "fail"
                text = (el.get("message") or el.text or "").strip()
                why = text.splitlines()[0][:160] if text else ""
                break
        res[name] = (status, why, float(case.get("time") or 0))
    return res


def main():
    out = sys.argv[1]
    runs = sys.argv[2:] or sorted(f[:-4] for f in os.listdir(out) if f.endswith(".xml"))
    data = {r: load(os.path.join(out, r + ".xml")) for r in runs}
    for r in runs:
        st = [s for s, _, _ in data[r].values()]
        secs = sum(t for _, _, t in data[r].values())
        print(f"# {r}: {st.count('pass')} pass, {st.count('skip')} skip, {st.count('fail')} fail "
              f"({secs / 60:.1f} min)")
    names = sorted(set().union(*data.values()))
    for n in names:
        cells = [data[r].get(n, ("-", "", 0)) for r in runs]
        why = next((w for s, w, _ in reversed(cells) if s != "pass" and w), "")
        print("\t".join([n] + [s for s, _, _ in cells] + [why]))


if __name__ == "__main__":
    main()
