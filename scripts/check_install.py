"""Dry-runs the install blocks of README.md's Installing section for their target machines.

Each ```bash block of the section whose first line is a comment naming its machine (`# CPU`, `# TPU VM`,
`# CUDA 12 host`) is split into commands; `bash scripts/setup.sh ARGS` is expanded into the commands it
runs (`DRY_RUN=1`). Every `pip install` is resolved with `pip install --dry-run --ignore-installed
--report -` by the target's Python (`--python`, this one by default), nothing installed; other commands
(apt, the PPA, venv, training) are listed as not checked. For each block it prints what would be installed (package==version) and checks which of torch, pytest and libtpu are in the set:
a TPU worker gets libtpu and neither torch nor pytest, a CUDA host none of the three, the CPU
development set all three (torch only for Python 3.11, whose CPU build is a local wheel).

    python3 scripts/check_install.py [--python /path/to/python3.12] [--only TPU] [--list]

The resolution runs on this machine, for its platform: the blocks' targets are Linux x86_64 hosts (a TPU
VM, a CUDA host) like this one. A wheel chosen here may need a newer glibc than the target's (2.35 on
Ubuntu 22.04, the TPU VM images): every wheel whose platform tags all need more is named, and fails the
check. pip's `--platform`/`--python-version` would resolve for another platform, but only from wheels,
and some pins are source-only (printed as `built from source`). `--list` prints the commands of each block without resolving (offline). Exit
status 1 when a set is not what its machine should get or pip cannot resolve it. Needs the registry.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WATCHED = ("torch", "pytest", "libtpu")
TARGET_GLIBC = (2, 35)  # Ubuntu 22.04
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
# What each machine's set must (True) and must not (False) contain; None: either.
EXPECTED = {
    "CPU": {"torch": None, "pytest": True, "libtpu": True},
    "TPU": {"torch": False, "pytest": False, "libtpu": True},
    "CUDA": {"torch": False, "pytest": False, "libtpu": False},
}


def readme_blocks(text: str) -> list[tuple[str, str, list[str]]]:
  """(machine, title, lines) of each ```bash block in the Installing section whose first line names one."""
  section = re.search(r"^## Installing\n(.*?)(?=^## )", text, re.S | re.M)
  if not section:
    raise SystemExit("README.md: no '## Installing' section")
  blocks = []
  for body in re.findall(r"```bash\n(.*?)```", section.group(1), re.S):
    lines = body.strip().splitlines()
    title = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else ""
    machine = next((m for m in EXPECTED if title.upper().startswith(m)), None)
    if machine:
      blocks.append((machine, title, lines[1:]))
  return blocks


def commands(lines: list[str]) -> list[str]:
  """Shell commands of a block: continuation lines joined, split at && and ;, comments dropped."""
  text = re.sub(r"\\\n", " ", "\n".join(lines))
  out = []
  for line in text.splitlines():
    line = line.split(" #")[0].strip()
    if line and not line.startswith("#"):
      out += [c.strip() for c in re.split(r"&&|;", line) if c.strip()]
  return out


def expand(command: str) -> list[str]:
  """`bash scripts/setup.sh ARGS` -> the commands it runs (its DRY_RUN output); others as they are."""
  words = shlex.split(command)
  if words[:2] != ["bash", "scripts/setup.sh"]:
    return [command]
  out = subprocess.run(words, cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DRY_RUN": "1", "PYTHON": os.environ.get("PYTHON", "python3")})
  if out.returncode != 0:
    raise SystemExit(f"{command}: {out.stderr.strip()}")
  return out.stdout.splitlines()


def pip_args(command: str) -> list[str] | None:
  """The arguments after `pip install`, or None for a command that is not a pip install."""
  words = shlex.split(command)
  for i in range(len(words) - 1):
    if words[i].endswith("pip") and words[i + 1] == "install":
      return [w for w in words[i + 2:] if w not in ("-q", "--quiet")]
  return None


def needs_newer_glibc(filename: str) -> bool:
  """Whether a wheel loads only with a glibc newer than TARGET_GLIBC (every platform tag of its name)."""
  if not filename.endswith(".whl"):
    return False
  needs = []
  for tag in filename[:-4].split("-")[-1].split("."):
    m = re.match(r"manylinux_(\d+)_(\d+)_", tag)
    legacy = next((v for k, v in LEGACY_MANYLINUX.items() if tag.startswith(k + "_")), None)
    if not m and legacy is None:
      return False  # any, or not tied to a glibc version
    needs.append((int(m.group(1)), int(m.group(2))) if m else legacy)
  return min(needs) > TARGET_GLIBC


def resolve(args: list[str], python: str) -> list[tuple[str, str, bool, bool]]:
  """(name, version, from source, needs a newer glibc) of what `python -m pip install ARGS` would install."""
  cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", "-", "--quiet", *args]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  if out.returncode != 0:
    errors = [l for l in out.stderr.splitlines() if l.startswith("ERROR")] or out.stderr.splitlines()[-3:]
    raise RuntimeError("; ".join(errors))
  report = json.loads(out.stdout)
  out = []
  for i in report["install"]:
    filename = i["download_info"]["url"].rsplit("/", 1)[-1]
    out.append((i["metadata"]["name"], i["metadata"]["version"], not filename.endswith(".whl"),
                needs_newer_glibc(filename)))
  return sorted(out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--python", default=sys.executable, help="the target's Python [this one]")
  parser.add_argument("--only", default="", help="check only the blocks whose title starts with this")
  parser.add_argument("--list", action="store_true", help="print the commands, resolve nothing")
  args = parser.parse_args(argv)
  version = subprocess.run([args.python, "-c", "import platform; print(platform.python_version())"],
                           capture_output=True, text=True, check=True).stdout.strip()
  libc = " ".join(platform.libc_ver())
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = readme_blocks(f.read())
  if not blocks:
    raise SystemExit("README.md: no install block in '## Installing'")
  ok = True
  for machine, title, lines in blocks:
    if not title.upper().startswith(args.only.upper()):
      continue
    print(f"== {title}")
    print(f"  resolved for Python {version}, {platform.system()} {platform.machine()}, {libc}")
    installed: dict[str, str] = {}
    source: set[str] = set()
    too_new: set[str] = set()
    for command in commands(lines):
      for cmd in expand(command):
        extra = pip_args(cmd)
        if extra is None:
          print(f"  not checked: {cmd}")
        elif "-e" in extra and "--no-deps" in extra:
          print(f"  this checkout, no dependencies: {cmd}")
        elif args.list:
          print(f"  pip: {cmd}")
        else:
          try:
            found = resolve(extra, args.python)
          except RuntimeError as e:
            print(f"  FAILED to resolve: {cmd}: {e}")
            ok = False
            continue
          print(f"  resolved ({len(found)} packages): {cmd}")
          installed.update((n, v) for n, v, _, _ in found)
          source.update(n for n, _, s, _ in found if s)
          too_new.update(f"{n}=={v}" for n, v, _, g in found if g)
    if args.list:
      continue
    print("  would install: " + " ".join(f"{n}=={v}" for n, v in sorted(installed.items(), key=lambda x: x[0].lower())))
    if source:
      print("  built from source: " + " ".join(sorted(source, key=str.lower)))
    glibc = ".".join(map(str, TARGET_GLIBC))
    print(f"  wheels needing a glibc newer than {glibc}: " + (" ".join(sorted(too_new)) or "none"))
    ok &= not too_new
    names = {n.lower().replace("_", "-") for n in installed}
    verdicts = []
    for name in WATCHED:
      present, want = name in names, EXPECTED[machine][name]
      good = want is None or present == want
      ok &= good
      verdicts.append(f"{name} {'present' if present else 'absent'}{'' if good else ' (WRONG)'}")
    print("  " + ", ".join(verdicts))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
