"""Counts of a pytest JUnit XML file as one line ("N passed, N failed, N skipped"), or with
--total FILE..., the sum of several. With --fail-on-skip-except WORD (repeatable), exits 1 (listing them) when
a test was skipped for a reason that mentions none of the WORDs."""

import argparse
import sys
import xml.etree.ElementTree as ET


def counts(path):
    passed = failed = skipped = 0
    reasons = []
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return None, [f"no results in {path}: {e}"]
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
        elif case.find("skipped") is not None:
            skipped += 1
            node = case.find("skipped")
            reasons.append(f"{case.get('classname')}::{case.get('name')}: {node.get('message', '')}")
        else:
            passed += 1
    return (passed, failed, skipped), reasons


def line(c):
    return "no results" if c is None else f"{c[0]} passed, {c[1]} failed, {c[2]} skipped"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+")
    parser.add_argument("--total", action="store_true")
    parser.add_argument("--fail-on-skip-except", action="append")
    args = parser.parse_args()
    if args.total:
        total = [0, 0, 0]
        for f in args.files:
            c, _ = counts(f)
            total = [a + b for a, b in zip(total, c or (0, 1, 0))]
        print(line(total))
        return 0
    c, reasons = counts(args.files[0])
    if args.fail_on_skip_except is None:
        print(line(c))
        return 0
    allowed = args.fail_on_skip_except
    bad = [r for r in reasons if not any(word in r for word in allowed)] if c is not None else reasons
    for r in bad:
        print(f"skipped for a reason other than {' / '.join(allowed)}: {r}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
