"""The docs cannot rot: README.md and docs/*.md are checked against the code, CI and bench/RESULTS.md.

What the docs must follow (and this file enforces):
- Every fenced block names its language: `bash` (commands), `python` (code) or `text` (output).
- Every command of a bash block is checked statically (below). A block whose commands need what
  CI lacks (a GPU, a TPU pod, SLURM, network, data a clone does not have) says so on the line just
  above it, `<!-- needs: WHAT -->`. In such a block commands this file does not know (gcloud, ...)
  are allowed; the ones it knows are still checked; none is run. A block that uses a GPU, a pod,
  SLURM or --distributed without that line fails.
- Static checks, each naming the doc, the line and the token at fault:
  `python -m MOD`: MOD is importable, and for jaxsae and bench modules every --flag is defined in
  MOD's source (absl DEFINE_* or argparse add_argument; absl's own --help, --helpfull, ...);
  `--config=FILE[:ARG]`: FILE exists, and every `--config.a.b=` names a field of its get_config();
  `python X.py`, `bash X`, `launch/X.sh`, `sbatch X`: the file exists (X.py's flags as a module's;
  a launch script's flags before `--` are its own `case` patterns, those after it jaxsae.main's);
  `python -c CODE`: CODE compiles; `pip install -e ".[a,b]"`: those extras exist; `-c FILE`: the
  file exists; `jaxsae-train`: the console script exists. Words in capitals (PATH, STORE, DIR),
  `...` and `$VAR` are placeholders and `[...]` marks an optional part: not checked.
- Run for real, at tiny sizes (each a few seconds): every `python -m jaxsae.plan` line, the dry
  run of every jaxsae.main line whose data is synthetic or the store made here, `--helpfull`, and
  data.md's path from arrays to a store, read from Python, to a dry run on it. Training itself is
  run by tests/test_cli.py and tests/test_quickstart.py.
- The README's results table: every number in a row appears in the bench/RESULTS.md section its
  last cell links to; the README's test command is the one .ci/run runs.
"""
import ast
import atexit
import functools
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs"))
                              if f.endswith(".md"))
LANGUAGES = {"bash", "python", "text"}
KNOWN = {"python", "python3", "jaxsae-train", "bash", "pip", "sbatch", "cd", "mkdir", "export"}
# Whatever CI's CPU machine cannot do: a block holding one of these must say what it needs.
HARDWARE = ("sbatch", "launch/tpu_pod.sh", "--distributed", "JAX_PLATFORMS=cuda", "bench/gpu/",
            "bench/kernels.py")
ABSL_FLAGS = {"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok", "v", "verbosity",
              "logtostderr", "alsologtostderr", "log_dir", "stderrthreshold"}
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]+\b|\.\.\.|^\$|\$\w|SUBST")
SEPARATORS = {"&&", "||", ";", "|"}


def _read(rel):
  with open(os.path.join(REPO, rel)) as f:
    return f.read()


# ---- the docs' fenced blocks and their commands --------------------------------------------------

def _blocks(rel):
  """(rel, first line number, language, [(line number, logical line)], needs) per fenced block."""
  out, lines, i = [], _read(rel).split("\n"), 0
  while i < len(lines):
    m = re.match(r"^```(\w*)\s*$", lines[i])
    if not m:
      i += 1
      continue
    start, lang, body = i + 1, m.group(1), []
    prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
    needs = re.match(r"^<!-- needs: (.+) -->$", prev.strip())
    i += 1
    while i < len(lines) and not lines[i].startswith("```"):
      body.append((i + 1, lines[i]))
      i += 1
    i += 1
    logical, cont = [], None
    for number, text in body:   # join backslash continuations, keep the first line's number
      if cont is not None:
        cont = (cont[0], cont[1] + " " + text.strip())
      else:
        cont = (number, text)
      if cont[1].rstrip().endswith("\\"):
        cont = (cont[0], cont[1].rstrip()[:-1])
      else:
        logical.append(cont)
        cont = None
    out.append((rel, start, lang, logical, needs.group(1) if needs else None))
  return out


def _all_blocks():
  return [b for rel in DOCS for b in _blocks(rel)]


def _drop_substitutions(line):
  """$(...) and <(...), nested parentheses included, become the placeholder SUBST."""
  out, i = [], 0
  while i < len(line):
    if line[i] in "$<" and line[i + 1:i + 2] == "(":
      depth, j = 0, i + 1
      while j < len(line):
        depth += {"(": 1, ")": -1}.get(line[j], 0)
        if depth == 0:
          break
        j += 1
      out.append("SUBST")
      i = j + 1
    else:
      out.append(line[i])
      i += 1
  return "".join(out)


def _commands(line):
  """The commands of one logical shell line: lists of tokens, leading VAR=value dropped."""
  tokens = shlex.split(_drop_substitutions(line), comments=True)
  commands, current = [], []
  for tok in tokens + [";"]:
    if tok in SEPARATORS:
      while current and re.match(r"^[A-Za-z_]\w*=", current[0]):
        current.pop(0)
      if current:
        commands.append(current)
      current = []
    else:
      current.append(tok)
  return commands


def _optional(tokens, keep):
  """[--flag] marks an optional part: kept without its brackets (keep) or left out."""
  out = []
  for tok in tokens:
    if tok.startswith("[") or (tok.endswith("]") and "[" not in tok):   # not .[test,dump]
      if keep:
        out.append(tok.removeprefix("[").removesuffix("]"))
    else:
      out.append(tok)
  return out


# ---- what the code defines --------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _defined_flags(source_path):
  """Flags a module defines: absl DEFINE_*("name", ...) or argparse add_argument("--name")."""
  src = _read(source_path)
  names = set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", src))
  names |= set(re.findall(r"add_argument\(\s*[\"']--([\w-]+)[\"']", src))
  return names


def _module_source(mod):
  spec = importlib.util.find_spec(mod)
  return os.path.relpath(spec.origin, REPO) if spec and spec.origin else None


@functools.lru_cache(maxsize=None)
def _config(path):
  """get_config() of configs/X.py; one that takes a store path gets a stand-in store's."""
  module = importlib.import_module(path[:-3].replace("/", "."))
  if inspect.signature(module.get_config).parameters:
    fake = os.path.join(_fake_store_dir(), "store")
    return module.get_config(fake)
  return module.get_config()


@functools.lru_cache(maxsize=None)
def _fake_store_dir():
  """A folder with just the metadata.json that configs/store.py reads (d and rows)."""
  import tempfile
  root = tempfile.mkdtemp(prefix="test_docs_")
  atexit.register(shutil.rmtree, root, True)
  os.makedirs(os.path.join(root, "store"))
  with open(os.path.join(root, "store", "metadata.json"), "w") as f:
    json.dump({"d": 16, "rows": 100_000}, f)
  return root


def _has_field(config, dotted):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def _toml_keys(table):
  """Keys of one [table] of pyproject.toml (no tomllib before Python 3.11)."""
  text = _read("pyproject.toml").split(f"\n[{table}]\n", 1)[1].split("\n[", 1)[0]
  return set(re.findall(r"^([\w-]+)\s*=", text, re.M))


def _extras():
  return _toml_keys("project.optional-dependencies"), _toml_keys("project.scripts")


# ---- the static checks -------------------------------------------------------------------------

def _check_flags(where, args, flags, module):
  """--flags in args against the defined set; --config and --config.* against the config."""
  errors, config = [], None
  dashes_ok = module == "jaxsae.dump"   # its parser reads --from-npy as --from_npy
  for tok in args:
    if not tok.startswith("--") or tok == "--":
      continue
    name, _, value = tok[2:].partition("=")
    if PLACEHOLDER.search(name):
      continue
    if name == "config" and "config" in flags:
      path, _, arg = value.partition(":")
      if PLACEHOLDER.search(path):
        continue
      if not os.path.isfile(os.path.join(REPO, path)):
        errors.append(f"{where}: {tok}: no file {path}")
        continue
      config = _config(path)   # a store path after the colon: a stand-in store
      continue
    if name.startswith("config.") and "config" in flags:
      field = name[len("config."):]
      if config is None:
        errors.append(f"{where}: {tok}: an override without a checkable --config before it")
      elif not _has_field(config, field):
        errors.append(f"{where}: {tok}: no config field {field}")
      continue
    if name in ABSL_FLAGS:
      continue
    candidates = {name, name.replace("-", "_") if dashes_ok else name}
    if name.startswith("no"):
      candidates.add(name[2:])
    if not candidates & flags:
      errors.append(f"{where}: {tok}: {module} defines no flag --{name}")
  return errors


def _check_module(where, mod, args):
  if importlib.util.find_spec(mod) is None:
    return [f"{where}: python -m {mod}: no such module"]
  source = _module_source(mod)
  if source is None or not (mod.startswith("jaxsae") or mod.startswith("bench")):
    return _check_paths(where, args)   # another tool (pytest): its file arguments must exist
  return _check_flags(where, args, _defined_flags(source), mod)


def _check_paths(where, args):
  return [f"{where}: {tok}: no such file" for tok in args
          if not tok.startswith("-") and "/" in tok and not tok.startswith("/")
          and not PLACEHOLDER.search(tok) and re.search(r"\.(py|sh|md|sbatch)$", tok)
          and not os.path.exists(os.path.join(REPO, tok))]


def _check_script(where, script, args):
  if PLACEHOLDER.search(script):
    return []
  if not os.path.isfile(os.path.join(REPO, script)):
    return [f"{where}: {script}: no such file"]
  if script.endswith(".py"):
    return _check_flags(where, args, _defined_flags(script), script)
  if script.startswith("launch/"):   # its own options, then -- and the training flags
    own = set(re.findall(r"^\s*--([\w-]+)(?:=\*)?\)", _read(script), re.M))
    cut = args.index("--") if "--" in args else len(args)
    errors = _check_flags(where, args[:cut], own, script)
    return errors + _check_module(where, "jaxsae.main", args[cut + 1:])
  return []


def _check_command(where, cmd, marked):
  cmd = _optional(cmd, keep=True)
  word, args = cmd[0], cmd[1:]
  if word in ("python", "python3"):
    if args[:1] == ["-m"]:
      return _check_module(where, args[1], args[2:])
    if args[:1] == ["-c"]:
      try:
        compile(args[1], where, "exec")
      except SyntaxError as e:
        return [f"{where}: python -c: {e}"]
      return []
    return _check_script(where, args[0], args[1:])
  if word == "jaxsae-train":
    scripts = _extras()[1]
    errors = [] if word in scripts else [f"{where}: jaxsae-train: no such console script"]
    return errors + _check_module(where, "jaxsae.main", args)
  if word == "bash" or word.endswith(".sh"):
    script = args[0] if word == "bash" else word
    return _check_script(where, script, args[1:] if word == "bash" else args)
  if word == "sbatch":
    i = next((i for i, t in enumerate(args) if t.endswith(".sbatch")), None)
    if i is None:
      return [f"{where}: sbatch without a .sbatch file"]
    errors = _check_script(where, args[i], [])
    return errors + _check_module(where, "jaxsae.main", args[i + 1:])
  if word == "pip":
    return _check_pip(where, args)
  if word in KNOWN or marked:
    return []
  return [f"{where}: {word}: a command tests/test_docs.py does not check; mark the block "
          "<!-- needs: ... --> or teach the test"]


def _check_pip(where, args):
  errors, extras = [], _extras()[0]
  for flag, value in zip(args, args[1:]):
    if flag == "-e":
      m = re.match(r"^\.(?:\[([\w,-]+)\])?$", value)
      if not m:
        errors.append(f"{where}: pip -e {value}: not this repository")
      elif m.group(1) and set(m.group(1).split(",")) - extras:
        errors.append(f"{where}: pip -e {value}: no extra {set(m.group(1).split(',')) - extras}")
    if flag == "-c" and not PLACEHOLDER.search(value) and not os.path.isfile(
        os.path.join(REPO, value)):
      errors.append(f"{where}: pip -c {value}: no such file")
  return errors


def test_every_fenced_block_names_its_language():
  bad = [f"{rel}:{start}: ```{lang}" for rel, start, lang, _, _ in _all_blocks()
         if lang not in LANGUAGES]
  assert not bad, "blocks need a language (bash, python or text):\n" + "\n".join(bad)


def test_every_quoted_command_names_what_exists():
  errors = []
  for rel, start, lang, lines, needs in _all_blocks():
    if lang == "python":
      try:
        ast.parse("\n".join(text for _, text in lines))
      except SyntaxError as e:
        errors.append(f"{rel}:{start}: python block: {e}")
      continue
    if lang != "bash":
      continue
    for number, line in lines:
      where = f"{rel}:{number}"
      if not needs and any(h in line for h in HARDWARE):
        errors.append(f"{where}: needs hardware CI lacks: put <!-- needs: ... --> above the block")
      try:
        commands = _commands(line)
      except ValueError as e:
        errors.append(f"{where}: cannot split {line!r}: {e}")
        continue
      for cmd in commands:
        errors += _check_command(where, cmd, bool(needs))
  assert not errors, "\n".join(errors)


# ---- commands run for real ----------------------------------------------------------------------

def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _run(args, timeout=120):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=timeout)


def _runnable(prefix):
  """(where, tokens) of every unmarked doc command that starts with prefix (tokens)."""
  out = []
  for rel, start, lang, lines, needs in _all_blocks():
    if lang != "bash" or needs:
      continue
    for number, line in lines:
      for cmd in _commands(line):
        cmd = _optional(cmd, keep=False)
        if cmd[:len(prefix)] == prefix:
          out.append((f"{rel}:{number}", cmd))
  return out


def test_the_planner_commands_run():
  commands = _runnable(["python", "-m", "jaxsae.plan"])
  assert commands, "the docs quote no python -m jaxsae.plan command to run"
  for where, cmd in commands:
    r = _run(cmd[1:])
    assert r.returncode == 0 and "fits (" in r.stdout, f"{where}: {' '.join(cmd)}\n{r.stderr[-2000:]}"


@pytest.fixture(scope="module")
def my_store(tmp_path_factory):
  """data.md's store from arrays, made by data.md's own dump command at a tiny size."""
  tmp = tmp_path_factory.mktemp("docs_store")
  rng = np.random.default_rng(0)
  np.save(tmp / "acts.npy", rng.standard_normal((65536, 16)).astype(np.float32))
  np.save(tmp / "tokens.npy", rng.integers(0, 1000, 65536).astype(np.int32))
  dumps = [(w, c) for w, c in _runnable(["python", "-m", "jaxsae.dump"])
           if any(t.startswith("--from-npy") for t in c) and w.startswith("docs/data.md")]
  assert dumps, "docs/data.md quotes no dump --from-npy command"
  where, cmd = dumps[0]
  subst = {"acts.npy": str(tmp / "acts.npy"), "tokens.npy": str(tmp / "tokens.npy"),
           "/tmp/my_store": str(tmp / "my_store")}
  args = [re.sub(r"(?<==)(acts\.npy|tokens\.npy|/tmp/my_store)$", lambda m: subst[m.group(1)], t)
          for t in cmd[1:]]
  r = _run(args)
  assert r.returncode == 0, f"{where}: {' '.join(args)}\n{r.stderr[-2000:]}"
  return str(tmp / "my_store")


def test_reading_a_store_from_python_as_data_md_shows(my_store, capsys):
  blocks = [b for b in _blocks("docs/data.md") if b[2] == "python"]
  assert blocks, "docs/data.md shows no Python"
  for rel, start, _, lines, _ in blocks:
    code = "\n".join(text for _, text in lines).replace("/tmp/my_store", my_store)
    exec(compile(code, f"{rel}:{start}", "exec"), {})
  assert "65536 16 float32 ['acts', 'tokens']" in capsys.readouterr().out


def test_the_training_commands_dry_run(my_store, tmp_path):
  """Every jaxsae.main line on synthetic data or the store above, as a dry run: the config loads,
  the overrides apply, the mesh, data and memory plan check out."""
  ran = set()
  for where, cmd in _runnable(["python", "-m", "jaxsae.main"]):
    args = [t.replace("/tmp/my_store", my_store) for t in cmd[3:]]
    args = [f"--workdir={tmp_path / 'w'}" if t.startswith("--workdir=") else t for t in args]
    if any(PLACEHOLDER.search(t) for t in args):
      continue
    config = next((t.split("=", 1)[1] for t in args if t.startswith("--config=")), None)
    if config is not None and config.split(":")[0] not in ("configs/quickstart.py",
                                                           "configs/sweep.py", "configs/store.py"):
      continue   # real data a clone lacks: checked statically only
    if config is not None and "--dry_run" not in args:
      args.append("--dry_run")
    if tuple(args) in ran:
      continue
    ran.add(tuple(args))
    r = _run(["-m", "jaxsae.main", *args])
    if "--helpfull" in args:   # absl's help exits with status 1
      assert "--dry_run" in r.stdout and "--config" in r.stdout, f"{where}: {r.stdout[-2000:]}"
      continue
    assert r.returncode == 0, f"{where}: {' '.join(args)}\n{r.stderr[-2000:]}"
    assert "\ndata " in r.stdout and "kernels" in r.stdout, f"{where}: {r.stdout[-2000:]}"
  assert len(ran) >= 4, ran   # quickstart, sweep, the store, --helpfull


# ---- README against CI and bench/RESULTS.md -----------------------------------------------------

def _section(text, heading):
  """The lines under a markdown heading, up to the next heading of the same or a higher level."""
  lines = text.split("\n")
  level = len(heading) - len(heading.lstrip("#"))
  start = lines.index(heading)
  end = next((i for i in range(start + 1, len(lines))
              if re.match(rf"^#{{1,{level}}} ", lines[i])), len(lines))
  return "\n".join(lines[start + 1:end])


def test_the_readme_test_command_is_what_ci_runs():
  ci = _read(".ci/run").split("\n")
  marker = ci.index("# --- the README's test command, verbatim ---")
  blocks = [b for b in _blocks("README.md") if b[2] == "bash"]
  two = _section(_read("README.md"), "## Two commands")
  assert "```bash\n" + ci[marker + 1] + "\n```" in two, (ci[marker + 1], two)
  assert blocks[1][3][0][1] == ci[marker + 1]


NUMBER = re.compile(r"(?<![\w.^/-])(\d+(?:,\d{3})*(?:\.\d+)?(?:e-\d+)?)(?![\w.^])")


def _numbers(text):
  return {m.replace(",", "") for m in NUMBER.findall(text.replace("**", ""))}


def _anchor(heading):
  """GitHub's anchor for a heading."""
  text = heading.lstrip("#").strip().lower()
  return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _results_rows():
  rows = [line for line in _section(_read("README.md"), "## Results").split("\n")
          if line.startswith("|")]
  return rows[2:]   # past the header and its rule


def test_readme_results_match_bench_results():
  results = _read("bench/RESULTS.md")
  current = _section(results, "## Current figures")
  sections = {_anchor(h): _section(current, h) for h in re.findall(r"^###+ .+$", current, re.M)}
  rows = _results_rows()
  assert len(rows) >= 6, rows
  errors = []
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    link = re.search(r"\(bench/RESULTS\.md#([\w-]+)\)", cells[-1])
    if not link or link.group(1) not in sections:
      errors.append(f"README.md results row {cells[0]!r}: its last cell must link to a section of "
                    f"bench/RESULTS.md's current figures ({sorted(sections)})")
      continue
    missing = _numbers(" ".join(cells[:-1])) - _numbers(sections[link.group(1)])
    if missing:
      errors.append(f"README.md results row {cells[0]!r}: {sorted(missing)} not in bench/RESULTS.md "
                    f"#{link.group(1)}")
  assert not errors, "\n".join(errors)
