"""Config files and paths a user (or a mistake) can throw at the CLI: duplicate keys, YAML bombs, huge or binary
files, ``~`` in paths, directories where a file is expected, run names that cannot be folders.

Each case must end in one line per problem on stderr and exit 2, quickly, in bounded memory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ddp_train.config import ConfigError, load_config

from .helpers import ROOT, TINY, assert_ok, clean_env, run_cli

PREFIX = "ddp_train: error: "
MAX_CONFIG_BYTES = 2**20  # the documented limit (docs/configuration.md: "The file, its keys and paths"): 1 MiB


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def assert_one_line(res: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit 2 and exactly one ``ddp_train: error:`` line on stderr holding every one of ``parts``."""
    lines = error_lines(res)
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(PREFIX), res.stderr[-3000:]
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- duplicate keys


def test_a_section_given_twice_is_refused_naming_both_lines(tmp_path):
    # The file: the second train: section silently replaced the first (3 epochs at lr 0.5).
    f = tmp_path / "config.yaml"
    f.write_text("train:\n  epochs: 1\n  lr: 0.1\nmodel:\n  width: 8\ntrain:\n  lr: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(err.value) == (f"{f}:6: section 'train' given twice (first at line 1); merge the two into one")


def test_a_key_given_twice_in_a_section_is_refused(tmp_path):
    f = tmp_path / "config.yaml"
    f.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.5\nout_dir: a\nout_dir: b\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    # One line per duplicate, each a complete error line once the CLI prefixes the first.
    assert (PREFIX + str(err.value)).splitlines() == [
        f"{PREFIX}{f}:4: key 'train.lr' given twice (first at line 2); keep one",
        f"{PREFIX}{f}:6: key 'out_dir' given twice (first at line 5); keep one",
    ]


def test_cli_duplicates_are_one_line_each_and_exit_2(tmp_path):
    f = tmp_path / "config.yaml"
    f.write_text("train:\n  epochs: 1\ntrain:\n  epochs: 3\n  lr: 0.5\n  lr: 0.4\n")
    res = run_cli(["--config", str(f), f"out_dir={tmp_path / 'out'}"], timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert error_lines(res) == [
        f"{PREFIX}{f}:3: section 'train' given twice (first at line 1); merge the two into one",
        f"{PREFIX}{f}:6: key 'train.lr' given twice (first at line 5); keep one",
    ], res.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_an_override_given_twice_on_the_command_line_last_wins():
    # Documented: the command line is built in layers (the tests' TINY_125 on TINY, launch scripts), so the
    # later key=value replaces the earlier one; only a file's duplicates are refused.
    assert load_config(None, ["train.lr=0.1", "train.lr=0.5"]).train.lr == 0.5


# --------------------------------------------------------------------------- YAML resource abuse


def bomb(levels: int = 9) -> str:
    """A billion-laughs value: 9 levels of 9 aliases of the level below, 9**9 (387 million) leaves, 300 characters."""
    names = "abcdefghijklmnop"[:levels]
    parts = ["&a [x,x,x,x,x,x,x,x,x]"]
    for prev, cur in zip(names, names[1:]):
        parts.append(f"&{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


def run_bounded(args: list[str], extra_gib: float = 1.0, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI's main(args) in a process whose address space may grow by only ``extra_gib`` after the imports
    (torch alone maps several GB, more on some builds), so a regression ends in a MemoryError here instead of
    taking the machine's memory; a run past ``timeout`` fails the test (TimeoutExpired)."""
    code = (
        "import resource, sys\n"
        "from ddp_train.cli import main\n"
        "size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize:')).split()[1]) * 1024\n"
        f"limit = size + int({extra_gib} * 2**30)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        f"sys.exit(main({args!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_alias_bomb_in_a_file_is_refused_in_bounded_memory(tmp_path):
    f = tmp_path / "bomb.yaml"
    f.write_text("train:\n  epochs: " + bomb() + "\n")
    assert_one_line(run_bounded(["--config", str(f), f"out_dir={tmp_path}"]),
                    f"{f}:2: YAML anchors and aliases (&a) are not accepted")


def test_alias_bomb_in_an_override_is_refused_in_bounded_memory(tmp_path):
    line = assert_one_line(run_bounded(["train.epochs=" + bomb(), f"out_dir={tmp_path}"]),
                           "override 'train.epochs=", "YAML anchors and aliases (&a) are not accepted")
    assert len(line) < 400, line  # the 300-character value is shortened in the message


def test_any_alias_is_refused_with_its_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.1\n  epochs: 2\nmodel:\n  width: *w\n")
    with pytest.raises(ConfigError, match=r"c.yaml:5: YAML anchors and aliases \(\*w\) are not accepted"):
        load_config(f)


def test_a_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path):
    f = tmp_path / "huge.yaml"
    f.write_text("# " + "x" * MAX_CONFIG_BYTES + "\ntrain:\n  epochs: 1\n")
    size = f.stat().st_size
    with pytest.raises(ConfigError, match=rf"--config {f} is {size} bytes; a config file is at most "
                                          rf"1 MiB \({MAX_CONFIG_BYTES} bytes\)"):
        load_config(f)


def test_many_values_and_deep_nesting_are_refused_in_one_line(tmp_path):
    many = tmp_path / "many.yaml"
    many.write_text("train:\n  epochs: [" + ",".join(["1"] * 400_000) + "]\n")  # 800 kB, under the size cap
    deep = tmp_path / "deep.yaml"
    deep.write_text("train:\n  epochs: " + "[" * 5000 + "]" * 5000 + "\n")  # was a RecursionError traceback
    res = run_bounded(["--config", str(many), f"out_dir={tmp_path}"])
    assert_one_line(res, f"{many}:2: more than 10000 YAML values")
    assert_one_line(run_bounded(["--config", str(deep), f"out_dir={tmp_path}"]), f"{deep}:2: nested more than")
    assert_one_line(run_bounded(["train.epochs=" + "[" * 5000, f"out_dir={tmp_path}"]),
                    "override 'train.epochs=[[[", "nested more than")
    assert_one_line(run_bounded(["data.root=" + "d/" * 5000, f"out_dir={tmp_path}"]),
                    "override 'data.root=d/d/", "is 10010 characters; an override is at most 8192")


def test_a_long_value_is_shortened_in_the_message():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epochs=" + "x" * 5000])
    message = str(err.value)
    assert message.startswith("train.epochs: expected an integer, got 'xxxx") and "..." in message
    assert len(message) < 200, message


# --------------------------------------------------------------------------- the --config file itself


def test_cli_binary_config_is_one_line(tmp_path):
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)) * 4)  # not UTF-8 (was a UnicodeDecodeError traceback)
    assert_one_line(run_cli(["--config", str(binary), f"out_dir={tmp_path / 'o'}"], timeout=120),
                    f"--config {binary} is not a text YAML file (not UTF-8: byte 0x80 at offset 128)")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"train:\n  epochs: 1\x00\x00\n")  # UTF-8, but binary data
    assert_one_line(run_cli(["--config", str(nul), f"out_dir={tmp_path / 'o'}"], timeout=120),
                    f"--config {nul} is not a text YAML file (a NUL byte at offset 18)")


def test_cli_config_directory_says_it_is_a_directory(tmp_path):
    assert_one_line(run_cli(["--config", str(tmp_path), f"out_dir={tmp_path / 'o'}"], timeout=120),
                    f"--config {tmp_path} is a directory; pass a YAML file (see configs/)")


def test_config_file_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config("/dev/null")


# --------------------------------------------------------------------------- ~ in paths


def test_tilde_is_expanded_in_every_path_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["out_dir=~/runs", "data.root=~/data", "model.init_from=~/w.pth", "resume=~/c/last.pt"])
    assert (cfg.out_dir, cfg.data.root, cfg.model.init_from, cfg.resume) == (
        f"{tmp_path}/runs", f"{tmp_path}/data", f"{tmp_path}/w.pth", f"{tmp_path}/c/last.pt")
    assert load_config(None, ["out_dir='~'"]).out_dir == str(tmp_path)
    with pytest.raises(ConfigError, match=r"out_dir: expected a string, got null \(.*a bare ~ is YAML's null; for the "
                                          r"home folder write '~' in quotes or the full path\)"):
        load_config(None, ["out_dir=~"])  # YAML reads a bare ~ as null
    assert load_config(None, ["out_dir=a/~b"]).out_dir == "a/~b"  # only a leading ~ means home
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 4\n")
    assert load_config("~/c.yaml").train.epochs == 4  # --config=~/c.yaml: no shell expands that


def test_an_unknown_user_after_tilde_is_refused():
    with pytest.raises(ConfigError, match=r"out_dir: cannot expand '~no-such-user-ddp/runs' \(no user "
                                          r"'no-such-user-ddp'\); write the full path"):
        load_config(None, ["out_dir=~no-such-user-ddp/runs"])


@pytest.mark.slow
def test_cli_out_dir_tilde_is_the_home_directory_not_a_folder_named_tilde(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = clean_env(HOME=str(home), PYTHONPATH=str(ROOT))
    res = run_cli([*TINY, "train.epochs=1", "data.synthetic_size=100", "out_dir=~/runs", "run_name=r"],
                  cwd=work, env=env)
    assert_ok(res)
    assert (home / "runs" / "r" / "checkpoints" / "last.pt").is_file()
    assert not (work / "~").exists() and list(work.iterdir()) == []
    assert f"{home}/runs/r" in res.stdout  # the start line names the real folder


# --------------------------------------------------------------------------- run_name and out_dir as folder names


@pytest.mark.parametrize("name, meaning", [(".", "out_dir itself"), ("..", "the folder above out_dir")])
def test_dot_run_names_say_what_is_wrong(name, meaning):
    # Was "run_name: expected a folder name without '/', got '..'": there is no '/' in it.
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"run_name={name}"])
    assert str(err.value) == f"run_name: '{name}' is not a folder name (it means {meaning}); choose a name such as my-run"
    with pytest.raises(ConfigError, match="run_name: expected a folder name without '/', got 'a/b'"):
        load_config(None, ["run_name=a/b"])


def test_a_run_name_over_255_bytes_says_it_is_too_long():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["run_name=" + "é" * 128])  # 256 bytes in UTF-8, 128 characters
    message = str(err.value)
    assert message.startswith("run_name: 256 bytes is too long for a folder name (at most 255 bytes); "
                              "choose a shorter name, got 'éééé"), message
    assert len(message) < 250
    load_config(None, ["run_name=" + "a" * 255])  # the limit itself is fine


def test_an_out_dir_folder_name_over_255_bytes_says_it_is_too_long(tmp_path):
    with pytest.raises(ConfigError, match=r"out_dir: the folder name 'aaa.*' is 300 bytes, too long for a folder "
                                          r"name \(at most 255 bytes\); choose a shorter out_dir"):
        load_config(None, [f"out_dir={tmp_path}/{'a' * 300}/runs"])


def test_nul_in_a_path_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text('out_dir: "runs\\0x"\n')  # a YAML escape: a NUL character (was a ValueError traceback)
    with pytest.raises(ConfigError, match="out_dir: a path cannot contain a NUL character"):
        load_config(f)


def test_cli_too_long_path_is_not_called_unwritable(tmp_path):
    # Each folder name fits, the whole path does not (PATH_MAX 4096): the run folder cannot be made.
    deep = "/".join(["d" * 200] * 25)
    res = run_cli([f"out_dir={tmp_path}/{deep}", "run_name=r"], timeout=120)
    line = assert_one_line(res, "is too long", "choose a shorter out_dir or run_name")
    assert "writable" not in line


# --------------------------------------------------------------------------- a directory where a file is expected


def test_directory_as_weights_file_says_it_is_a_directory(tmp_path):
    from ddp_train.persistence.weights import WeightsError, read_weights_file

    with pytest.raises(WeightsError) as err:
        read_weights_file(tmp_path, "model.init_from")
    assert str(err.value) == f"model.init_from: {tmp_path} is a directory, expected a file"
    with pytest.raises(WeightsError, match="does not exist"):
        read_weights_file(tmp_path / "missing.pt", "model.init_from")


def test_cli_eval_checkpoint_directory_says_it_is_a_directory(tmp_path):
    res = run_cli(["eval", "--checkpoint", str(tmp_path)], timeout=120)
    assert_one_line(res, f"--checkpoint: {tmp_path} is a directory, expected a file")


def test_predict_directory_input_says_it_is_a_directory(tmp_path):
    from ddp_train.commands.predict import InputError, load_input

    with pytest.raises(InputError) as err:
        load_input(tmp_path, 1, 28)
    assert str(err.value) == f"{tmp_path}: is a directory, expected an image file"
    with pytest.raises(InputError, match="no such file"):
        load_input(tmp_path / "missing.png", 1, 28)


def test_resume_directory_says_it_is_a_directory(tmp_path):
    from ddp_train.persistence.checkpoint import CheckpointError
    from ddp_train.persistence.resume import choose_checkpoint

    folder = tmp_path / "last.pt"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=f"resume: {folder} is a directory, expected a checkpoint file"):
        choose_checkpoint(str(folder), tmp_path)
