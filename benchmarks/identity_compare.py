"""``python benchmarks/identity_compare.py BEFORE AFTER``: compare two ``benchmarks/identity.sh`` outputs: every number (and string) of metrics.json, comparison.json and
ablation.json, leaving out wall times, dates, paths and run ids."""
import json, sys, hashlib, pathlib, re
SKIP = re.compile(r"(time|timing|wall|date|seconds|_s$|s_per_trial|elapsed|duration|cache_dir|path|uri|run_id|started|finished|url|dir$|host|cached$)", re.I)
def walk(a, b, where, diffs):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if SKIP.search(str(k)):
                continue
            if k not in a or k not in b:
                diffs.append(f"{where}.{k}: only in {'after' if k in b else 'before'}")
                continue
            walk(a[k], b[k], f"{where}.{k}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{where}: lengths {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, f"{where}[{i}]", diffs)
    else:
        if isinstance(a, str) and isinstance(b, str) and ("/" in a or "/" in b):
            return
        if a != b and not (a != a and b != b):
            diffs.append(f"{where}: {a!r} != {b!r}")
def canon(obj):
    if isinstance(obj, dict):
        return {k: canon(v) for k, v in sorted(obj.items()) if not SKIP.search(str(k))}
    if isinstance(obj, list):
        return [canon(v) for v in obj]
    if isinstance(obj, str) and "/" in obj:
        return "<path>"
    return obj
before, after = map(pathlib.Path, sys.argv[1:3])
total = 0
for rel in ["run/metrics.json", "compare/comparison.json", "ablate/ablation.json"]:
    a, b = json.loads((before / rel).read_text()), json.loads((after / rel).read_text())
    diffs = []
    walk(a, b, rel, diffs)
    da = hashlib.sha256(json.dumps(canon(a), sort_keys=True).encode()).hexdigest()[:16]
    db = hashlib.sha256(json.dumps(canon(b), sort_keys=True).encode()).hexdigest()[:16]
    print(f"{rel}: {len(diffs)} differences; digest of numbers before {da}, after {db}")
    for d in diffs[:15]:
        print("   ", d)
    total += len(diffs)
sys.exit(1 if total else 0)
