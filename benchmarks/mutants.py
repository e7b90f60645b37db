"""Mutation check of the test suite: each mutant below is one line of the library changed the way a
plausible bug would change it; the suite must fail on every one ("a test that cannot fail is a defect").

    python benchmarks/mutants.py [--only E1 S4 ...] [--out benchmarks/results/mutants.md]

Clones this repository's HEAD into a temporary folder, applies each mutant there in turn (never here),
runs the tests named beside it (a narrow selection: the whole suite is ~8 minutes) and reports KILLED
(the tests failed, as they must) or SURVIVED. Exit 1 if any survived. The list holds the survivors of a
review by hand (sessions of 2026-11-27): each was untested until the tests named beside it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (id, what the mutant breaks, file, the line(s) as they are, the mutant, the pytest arguments that must fail)
MUTANTS = [
    ('E1', 'gate refuses only when both bars are broken', 'tools/export.py',
     'if a1 > args.max_ssim + EPS or a2 > args.max_attack_ssim + EPS:',
     'if a1 > args.max_ssim + EPS and a2 > args.max_attack_ssim + EPS:',
     ['tests/test_export.py']),
    ('E2', 'gate ignores --max-attack-ssim', 'tools/export.py',
     'if a1 > args.max_ssim + EPS or a2 > args.max_attack_ssim + EPS:',
     'if a1 > args.max_ssim + EPS:',
     ['tests/test_export.py']),
    ('E3', 'gate ignores --max-ssim', 'tools/export.py',
     'if a1 > args.max_ssim + EPS or a2 > args.max_attack_ssim + EPS:',
     'if a2 > args.max_attack_ssim + EPS:',
     ['tests/test_export.py']),
    ('E6', 'exported labels all 0', 'tools/export.py',
     'shards.tar_sample(k, y, a) for k, a, y in samples',
     'shards.tar_sample(k, 0, a) for k, a, y in samples',
     ['tests/test_export.py']),
    ('E7', 'private map labels all 0', 'tools/export.py',
     'private_rows.append((k, items[k].item.rel, y, name, items[k].copy))',
     'private_rows.append((k, items[k].item.rel, 0, name, items[k].copy))',
     ['tests/test_export.py']),
    ('E8', 'receipt max is the mean', 'tools/export.py',
     '"max": round(float(v.max()), 6)}',
     '"max": round(float(v.mean()), 6)}',
     ['tests/test_export.py']),
    ('E9', 'receipt num_classes dropped', 'tools/export.py',
     '"num_classes": len(manifest["source"]["classes"]) if manifest["source"].get("classes") else None,',
     '"num_classes": None,',
     ['tests/test_export.py']),
    ('E10', 'gate scores the identity attack only', 'tools/export.py',
     'return np.asarray(report.per_sample_max, dtype=np.float64).reshape(-1)',
     'return np.asarray(report.attacks["identity"]["ssim"], dtype=np.float64).reshape(-1)',
     ['tests/test_export.py']),
    ('E12', 'damaged staged shard reused', 'tools/export.py',
     'if shards.file_sha256(staging / name) != rec["sha256"] or len(rec["keys"]) != len(rec["labels"]):',
     'if len(rec["keys"]) != len(rec["labels"]):',
     ['tests/test_export.py']),
    ('E16', 'copy order unchecked before averaging', 'tools/export.py',
     'if any(o is None or o.copy != c or o.item.rel != owned[0].item.rel for c, o in enumerate(owned)):',
     'if any(o is None for c, o in enumerate(owned)):',
     ['tests/test_export.py']),
    ('E19', 'receipt says forced whenever --force', 'tools/export.py',
     '"forced": bool(args.force and (offenders or avg_offenders)),',
     '"forced": bool(args.force),',
     ['tests/test_export.py']),
    ('E25', 'two copies not averaged', 'tools/export.py',
     'if gate and copies > 1 and manifest["num_veiled"]:',
     'if gate and copies > 2 and manifest["num_veiled"]:',
     ['tests/test_export.py']),
    ('S1', 'resume ignores a retrained model', 'veil_transforms/shards.py',
     '    "model_sha256": "the local model file",\n',
     '',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('S2', 'resume ignores a changed source listing', 'veil_transforms/shards.py',
     '_COMPAT_SOURCE = {"listing_sha256": "the source listing (files or labels changed)", "sample_shape": "the image shape"}',
     '_COMPAT_SOURCE = {"sample_shape": "the image shape"}',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('S4', 'shard not fsynced before rename', 'veil_transforms/shards.py',
     '        os.fsync(self.f.fileno())\n        self.f.close()',
     '        self.f.close()',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('S8', '--shard-size 0 accepted', 'veil_transforms/shards.py',
     '    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:',
     '    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 0:',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('S9', '--nproc 0 accepted', 'tools/shard.py',
     '    if args.nproc < 1:',
     '    if args.nproc < 0:',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('S10', 'new key not announced under --quiet', 'tools/shard.py',
     '    if plan.key_created or not quiet:',
     '    if not quiet:',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('S11', 'new key file 0644', 'veil_transforms/shards.py',
     '    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)',
     '    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('S14', 'exit 1 at exactly half skipped', 'tools/shard.py',
     '    if not m["complete"] or n * 2 <= total:',
     '    if not m["complete"] or n * 2 < total:',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('S16', 'shards without a manifest written over', 'veil_transforms/shards.py',
     '                if any(out.glob("veil-*.tar")):',
     '                if False:',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('S18', 'renamed model refuses a resume', 'veil_transforms/shards.py',
     '                if {**ov, "model": None} == {**nv, "model": None}:\n                    continue',
     '                pass',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('S25', '--precision ignored', 'tools/shard.py',
     'mode=args.mode, precision=args.precision,',
     'mode=args.mode, precision="fp32",',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('P1', 'veil-shard bar always off', 'tools/shard.py',
     'io_procs=args.io_procs, progress=not args.quiet)',
     'io_procs=args.io_procs, progress=False)',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('C1', '--quiet shows warnings', 'tools/_common.py',
     '    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING',
     '    level = logging.WARNING if quiet else logging.INFO if verbose else logging.WARNING',
     ['tests/test_shard.py', '-k', 'new_key_is_owner or half_are_skipped or bad_inputs_exit_2 or other_params_or_key']),
    ('M01', 'denormalize wraps instead of clamping', 'veil_transforms/functional.py',
     '    y = (x * 0.5 + 0.5).clamp(0.0, 1.0)',
     '    y = (x * 0.5 + 0.5)',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M03', 'negative float pixels accepted', 'veil_transforms/functional.py',
     '    if lo < -1e-6 or hi > 1 + 1e-6:',
     '    if hi > 1 + 1e-6:',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M65', 'float pixels up to 1.5 accepted', 'veil_transforms/functional.py',
     '    if lo < -1e-6 or hi > 1 + 1e-6:',
     '    if lo < -1e-6 or hi > 1.5:',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M05', 'distance term pulls x~ toward x', 'veil_transforms/functional.py',
     '    return l1 - beta * (x_tilde - x).flatten(1).norm(dim=1)',
     '    return l1 + beta * (x_tilde - x).flatten(1).norm(dim=1)',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M62', 'key and generator both accepted', 'veil_transforms/functional.py',
     '    if (key is None) == (generator is None):',
     '    if key is None and generator is None:',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M60', 'pad spot check skips the last sample', 'veil_transforms/functional.py',
     '        for i in sorted({0, len(xn) - 1}):',
     '        for i in [0]:',
     ['tests/test_hardened.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M69', 'veil() ignores p', 'veil_transforms/functional.py',
     '    x0 = random_pixel_flip(xn, p, generator,',
     '    x0 = random_pixel_flip(xn, 0.5, generator,',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M09', 'float input not snapped to 256 levels', 'veil_transforms/functional.py',
     'denormalize(xt, torch.uint8).float() / 255.0 if output == "uint8" else denormalize(xt, torch.float32)',
     'denormalize(xt, torch.float32)',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M70', 'float64 input returned as float32', 'veil_transforms/functional.py',
     '    return out.to(device=images.device, dtype=in_dtype)',
     '    return out.to(device=images.device)',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M77', 'precision missing from settings (cache folder)', 'veil_transforms/transform.py',
     'model=self.local_model.name, precision=self.precision,',
     'model=self.local_model.name,',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M38', 'VeilTransform ignores p', 'veil_transforms/transform.py',
     'key=self.key, p=self.p, alpha=self.alpha, beta=self.beta,',
     'key=self.key, p=0.5, alpha=self.alpha, beta=self.beta,',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M40', 'VeilTransform ignores beta', 'veil_transforms/transform.py',
     'key=self.key, p=self.p, alpha=self.alpha, beta=self.beta,',
     'key=self.key, p=self.p, alpha=self.alpha, beta=0.001,',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M37', 'VeilTransform ignores threshold', 'veil_transforms/transform.py',
     'threshold=self.threshold, output=self.output, mode=self.mode,',
     'threshold=0.3, output=self.output, mode=self.mode,',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M41', 'VeilTransform ignores output', 'veil_transforms/transform.py',
     'threshold=self.threshold, output=self.output, mode=self.mode,',
     "threshold=self.threshold, output='uint8', mode=self.mode,",
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M42', 'batched tv_tensors.Image unwrapped', 'veil_transforms/transform.py',
     '            return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out',
     '            return out',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M15', 'pad check tests the richest sample', 'veil_transforms/hardened.py',
     '    i = int(counts.argmin())',
     '    i = int(counts.argmax())',
     ['tests/test_hardened.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M18', 'copy keys off by one', 'veil_transforms/hardened.py',
     'for i in range(k)]',
     'for i in range(1, k + 1)]',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M23', 'key file 0644 (keys.read_key_file)', 'veil_transforms/keys.py',
     'os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)',
     'os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M21', 'sample digest unkeyed', 'veil_transforms/keys.py',
     '    h = hmac.new(key, b"veil-sample", hashlib.sha256)',
     '    h = hmac.new(b"k", b"veil-sample", hashlib.sha256)',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M20', 'sample digest ignores shape', 'veil_transforms/keys.py',
     '    h.update(np.asarray(a.shape, dtype=np.int64).tobytes())\n',
     '',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M29', 'batch-mixing F accepted', 'veil_transforms/model.py',
     '        if out.shape[0] != 2:',
     '        if False:',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M74', 'layer lost in pickling', 'veil_transforms/model.py',
     '            return (LocalModel, (self.module, self.layer), {"name": self.name})',
     '            return (LocalModel, (self.module, None), {"name": self.name})',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M52', 'namedtuple samples become tuples', 'veil_transforms/dataset.py',
     '        return tuple(out) if type(sample) is tuple else type(sample)(*out)',
     '        return tuple(out)',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M49', 'first access shares the memory cache', 'veil_transforms/dataset.py',
     'from_chw(v.clone(), im)',
     'from_chw(v, im)',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('M59', 'ssim truncates unequal batches', 'veil_transforms/metrics.py',
     '    if len(a) != len(b):',
     '    if False:',
     ['tests/test_core.py', '-k', 'clamps or distance_term or rate_p or own_settings or outside_0_1 or keyed_digests or model_problems or sample_types or guessed or derived_ahead']),
    ('A1', 'average_copies truncates', 'veil_transforms/audit.py',
     '    return np.rint(v.astype(np.float32).mean(0)).astype(np.uint8)',
     '    return v.astype(np.float32).mean(0).astype(np.uint8)',
     ['tests/test_audit.py', 'tests/test_export.py', '-k', 'both_bars or not_the_images_veiled or average']),
    ('A2', 'audit ignores the per-sample bar', 'veil_transforms/audit.py',
     '        return self.max_mean_ssim < self.thresholds[0] and self.max_ssim < self.thresholds[1]',
     '        return self.max_mean_ssim < self.thresholds[0]',
     ['tests/test_audit.py', 'tests/test_export.py', '-k', 'both_bars or not_the_images_veiled or average']),
    ('A10', 'audit passes at the bar', 'veil_transforms/audit.py',
     '        return self.max_mean_ssim < self.thresholds[0] and self.max_ssim < self.thresholds[1]',
     '        return self.max_mean_ssim <= self.thresholds[0] and self.max_ssim <= self.thresholds[1]',
     ['tests/test_audit.py', 'tests/test_export.py', '-k', 'both_bars or not_the_images_veiled or average']),
    ('T3', '--limit averages partial groups', 'tools/audit.py',
     'if copies > 1 and len(g) == copies]',
     'if copies > 1]',
     ['tests/test_audit.py', 'tests/test_export.py', '-k', 'both_bars or not_the_images_veiled or average']),
    ('T4', '--limit skips the content-tag check', 'tools/audit.py',
     '        covered = [min(tagged, key=lambda s: len(order[s["name"]]))]',
     '        covered = []',
     ['tests/test_audit.py', 'tests/test_export.py', '-k', 'both_bars or not_the_images_veiled or average']),
    ('M19', 'keys of 8-15 bytes accepted', 'veil_transforms/keys.py',
     '    if len(key) < 16:',
     '    if len(key) < 8:',
     ['tests/test_core.py', '-k', 'keyed_digests or sample_types']),
    ('M48', 'veil settings missing from the cache folder id', 'veil_transforms/dataset.py',
     '        s = json.dumps(self.veil.settings, sort_keys=True) + _keys.key_fingerprint(self.veil.key) \\',
     '        s = _keys.key_fingerprint(self.veil.key) \\',
     ['tests/test_core.py', '-k', 'keyed_digests or sample_types']),
    ('P2', 'veil-export bar always off', 'tools/export.py',
     'desc="exporting", disable=args.quiet)',
     'desc="exporting", disable=True)',
     ['tests/test_export.py', '-k', 'progress_bars']),
    ('M66', 'p given as a str or bool accepted', 'veil_transforms/functional.py',
     '    if not (_is_number(p) and 0.0 < float(p) < 1.0):',
     '    if not (0.0 < float(p) < 1.0):',
     ['tests/test_input_checks.py', '-k', 'rejects_bad_settings']),
    ('M80', 'an unknown output= accepted', 'veil_transforms/functional.py',
     '    if output not in ("uint8", "float"):',
     '    if output is None:',
     ['tests/test_input_checks.py', '-k', 'rejects_bad_settings']),
]


def pytest(clone: Path, tests: list[str]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=clone,
                       env=env, capture_output=True, text=True, timeout=900)
    lines = r.stdout.strip().splitlines()
    return r.returncode, lines[-1] if lines else r.stderr[-200:]


def run(clone: Path, mutant) -> tuple[str, str, float]:
    mid, _, rel, old, new, tests = mutant
    f = clone / rel
    src = f.read_text()
    if src.count(old) != 1:
        return "STALE", f"the original text occurs {src.count(old)} times in {rel}: update this list", 0.0
    f.write_text(src.replace(old, new))
    t0 = time.perf_counter()
    try:
        rc, last = pytest(clone, tests)
        return ("KILLED" if rc else "SURVIVED"), last, time.perf_counter() - t0
    finally:
        f.write_text(src)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=None, help="mutant ids to run (default: all)")
    ap.add_argument("--out", default=None, help="write the table here too (markdown)")
    args = ap.parse_args(argv)
    todo = [m for m in MUTANTS if args.only is None or m[0] in args.only]
    with tempfile.TemporaryDirectory(prefix="veil-mutants-") as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        # the tests read ../shared/data beside the repository; and an editable install maps
        # veil_transforms.tools to the installed tree's tools/: point both at the clone
        if (ROOT.parent / "shared").exists():
            os.symlink(ROOT.parent / "shared", Path(tmp) / "shared")
        os.symlink("../tools", clone / "veil_transforms" / "tools")
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        rows = [f"# Mutants at {head}\n", "Command: `python benchmarks/mutants.py`\n",
                "| id | what it breaks | file | result | tests |", "|---|---|---|---|---|"]
        for tests in dict.fromkeys(tuple(m[5]) for m in todo):  # unmutated, each selection must pass
            rc, last = pytest(clone, list(tests))
            if rc:
                print(f"baseline: {' '.join(tests)} fails without a mutant ({last}): fix that first", file=sys.stderr)
                return 2
        survived = 0
        for m in todo:
            verdict, last, secs = run(clone, m)
            survived += verdict != "KILLED"
            line = f"| {m[0]} | {m[1]} | {m[2]} | {verdict} ({secs:.0f} s) | {last} |"
            print(line, flush=True)
            rows.append(line)
    rows.append(f"\n{len(todo) - survived} of {len(todo)} killed.")
    print(rows[-1].strip())
    if args.out:
        Path(args.out).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
