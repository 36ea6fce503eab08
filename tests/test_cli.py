"""The command lines as a newcomer meets them: switches, --version, help on every flag, one-line
errors with exit code 2 for every value a user can type, and --help without loading grpc or
onnxruntime. The client command line is run for real against the session's server."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from server.__main__ import main as server_main
from server.client.__main__ import build_parser as client_parser
from server.client.__main__ import main as client_main
from server.config import ENV_PREFIX, Settings, build_parser, load_settings
from tests.conftest import TOL, reference

ROOT = Path(__file__).resolve().parents[1]
VERSION = metadata.version("lstm-serve")


def _one_line_error(capsys, call) -> str:
    """Run a CLI that must fail on its input: exit code 2, exactly one line on stderr, nothing on stdout."""
    try:
        code = call()
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


BAD_SERVER_VALUES = [
    # (argv, the exact message or, with "...", its start)
    (["--grace-s", "-5"], "error: --grace-s must be >= 0, got -5"),
    (["--grace-s", "nan"], "error: --grace-s must be a finite number, got nan"),
    (["--grace-s", "inf"], "error: --grace-s must be a finite number, got inf"),
    (["--grace-s", "soon"], "error: --grace-s: expected a number, got 'soon' ..."),
    (["--log-level", "LOUD"], "error: --log-level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
    (["--port", "70000"], "error: --port must be <= 65535, got 70000"),
    (["--port", "-1"], "error: --port must be >= 0, got -1"),
    (["--port", "80.5"], "error: --port: expected an integer, got '80.5' ..."),
    (["--http-port", "-2"], "error: --http-port must be >= -1, got -2"),
    (["--metrics-port", "65536"], "error: --metrics-port must be <= 65535, got 65536"),
    (["--workers", "0"], "error: --workers must be >= 1, got 0"),
    (["--grpc-workers", "0"], "error: --grpc-workers must be >= 1, got 0"),
    (["--max-message-mb", "4096"], "error: --max-message-mb must be <= 2047, got 4096"),
    (["--max-batch", "0"], "error: --max-batch must be >= 1, got 0"),
    (["--max-queue-delay-us", "-1"], "error: --max-queue-delay-us must be >= 0, got -1"),
    (["--max-queue", "0"], "error: --max-queue must be >= 1, got 0"),
    (["--instances", "0"], "error: --instances must be >= 1, got 0"),
    (["--max-elements", "0"], "error: --max-elements must be >= 1, got 0"),
    (["--max-request-batch", "-3"], "error: --max-request-batch must be >= 1, got -3"),
    (["--max-sequences", "-1"], "error: --max-sequences must be >= 0, got -1"),
    (["--sequence-idle-s", "0"], "error: --sequence-idle-s must be a number of seconds in (0, 1e9], got 0"),
    (["--intra-op-threads", "-1"], "error: --intra-op-threads must be >= 0, got -1"),
    (["--inter-op-threads", "-1"], "error: --inter-op-threads must be >= 0, got -1"),
    (["--drain-delay-s", "-0.5"], "error: --drain-delay-s must be >= 0, got -0.5"),
    (["--poll-s", "-1"], "error: --poll-s must be >= 0, got -1"),
    (
        ["--graph-optimization", "max"],
        "error: --graph-optimization must be one of disable, basic, extended, all, got 'max'",
    ),
    (["--device", "tpu"], "error: --device 'tpu': expected auto, cpu, cuda or cuda:N"),
    (["--tls-cert", "c.pem"], "error: --tls-cert and --tls-key go together"),
    (["--tls-client-ca", "ca.pem"], "error: --tls-client-ca needs --tls-cert and --tls-key"),
    (["--cuda-tf32", "1"], "error: unrecognized arguments: 1 ..."),
    (["--batching", "false"], "error: unrecognized arguments: false ..."),
    (["--no-such-flag"], "error: unrecognized arguments: --no-such-flag ..."),
    (["--port"], "error: --port: expected one argument ..."),
]


@pytest.mark.parametrize("argv,expected", BAD_SERVER_VALUES, ids=[" ".join(a) for a, _ in BAD_SERVER_VALUES])
def test_server_refuses_bad_values_in_one_line(capsys, monkeypatch, argv, expected):
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    err = _one_line_error(capsys, lambda: server_main(argv))
    if expected.endswith(" ..."):
        assert err.startswith(expected[:-4]) and err.endswith("(see python -m server --help)"), err
    else:
        assert err == expected


@pytest.mark.parametrize(
    "variable,value,expected",
    [
        ("GRACE_S", "-5", "LSTM_SERVE_GRACE_S='-5': must be >= 0, got -5"),
        ("BATCHING", "maybe", "LSTM_SERVE_BATCHING='maybe': expected true/false, got 'maybe'"),
        ("PORT", "http", "LSTM_SERVE_PORT='http': expected an integer, got 'http'"),
        ("LOG_LEVEL", "loud", "LSTM_SERVE_LOG_LEVEL='loud': must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got"),
    ],
)
def test_environment_errors_name_the_variable(capsys, monkeypatch, variable, value, expected):
    monkeypatch.setenv(ENV_PREFIX + variable, value)
    err = _one_line_error(capsys, lambda: server_main([]))
    assert err.startswith("error: " + expected), err


def test_switches_and_their_environment_variables():
    assert load_settings([], {}).batching is True and load_settings([], {}).cuda_tf32 is False
    assert load_settings(["--no-batching", "--cuda-tf32"], {}).batching is False
    assert load_settings(["--cuda-tf32"], {}).cuda_tf32 is True
    env = {"LSTM_SERVE_BATCHING": "false", "LSTM_SERVE_CUDA_TF32": "yes"}
    s = load_settings([], env)
    assert s.batching is False and s.cuda_tf32 is True
    s = load_settings(["--batching", "--no-cuda-tf32"], env)  # flag > environment
    assert s.batching is True and s.cuda_tf32 is False
    assert load_settings(["--batching", "--no-batching"], {}).batching is False  # the last one wins
    assert load_settings(["--log-level", "debug"], {}).log_level == "DEBUG"
    assert load_settings([], {"LSTM_SERVE_LOG_LEVEL": "warning"}).log_level == "WARNING"


def test_every_server_flag_has_help_and_names_its_variable():
    parser = build_parser()
    flags = {opt: action for action in parser._actions for opt in action.option_strings}
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags, flag
        assert f"(env {ENV_PREFIX}{f.name.upper()}; default " in flags[flag].help, flag
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    assert "--no-batching" in flags and "--no-cuda-tf32" in flags


def test_server_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        server_main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"python -m server {VERSION}\n"
    with pytest.raises(SystemExit) as exc:
        server_main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--batching, --no-batching" in out and "LSTM_SERVE_GRACE_S" in out


def test_help_and_errors_do_not_load_grpc_or_onnxruntime():
    """`--help`, `--version` and a flag error answer before the heavy imports (onnxruntime, grpc)."""
    code = (
        "import sys\n"
        "from server.__main__ import main\n"
        "for argv in (['--help'], ['--version'], ['--port', 'x']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert main(['--grace-s', '-1']) == 2\n"
        "heavy = {'grpc', 'onnxruntime', 'numpy', 'google.protobuf'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr


def test_subprocess_error_is_one_line():
    res = subprocess.run(
        [sys.executable, "-m", "server", "--log-level", "LOUD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == "error: --log-level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'\n"


# -- the client ----------------------------------------------------------------------------------


def test_every_client_flag_has_help(capsys):
    parser = client_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    with pytest.raises(SystemExit) as exc:
        client_main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"python -m server.client {VERSION}\n"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["x.npy", "--timeout", "-1"], "error: --timeout must be a positive number of seconds, got -1"),
        (["x.npy", "--timeout", "nan"], "error: --timeout must be a positive number of seconds, got nan"),
        (["x.npy", "--model-version", "v1"], "error: --model-version must be a version number, got 'v1'"),
        (["x.npy", "--model", ""], "error: --model must not be empty"),
        (["x.npy", "--tls-cert", "c.pem"], "error: --tls-cert and --tls-key go together"),
        (["x.npy", "--tls-cert", "c", "--tls-key", "k"], "error: --tls-cert and --tls-key need --tls-ca ..."),
        (["x.txt"], "error: x.txt: unsupported file type '.txt'; use .npy, .npz or .json"),
        (["/nonexistent/seqs.npz"], "error: [Errno 2] No such file or directory: '/nonexistent/seqs.npz'"),
        (["x.npy", "--timeout", "soon"], "error: --timeout: invalid float value: 'soon' ..."),
        ([], "error: give a sequences file, or --input NAME=FILE.npy for each input of the model"),
    ],
)
def test_client_refuses_bad_values_in_one_line(capsys, argv, expected):
    err = _one_line_error(capsys, lambda: client_main(argv))
    assert err.startswith(expected[:-4]) if expected.endswith(" ...") else err == expected, err


def test_client_rejects_files_that_are_not_what_they_say(tmp_path, capsys):
    bad_npz = tmp_path / "seqs.npz"
    bad_npz.write_bytes(b"not a zip file")
    assert _one_line_error(capsys, lambda: client_main([str(bad_npz)])).startswith("error: ")
    bad_json = tmp_path / "seqs.json"
    bad_json.write_text("[[1, 2], ")
    assert _one_line_error(capsys, lambda: client_main([str(bad_json)])).startswith("error: Expecting value")


def test_client_command_line_against_the_server(target, encoders, tmp_path, capsys):
    rng = np.random.default_rng(11)
    seqs = {"a": rng.standard_normal((5, 6)).astype(np.float32), "b": rng.standard_normal((9, 6)).astype(np.float32)}
    np.savez(tmp_path / "seqs.npz", **seqs)
    out = tmp_path / "out.npz"
    code = client_main([str(tmp_path / "seqs.npz"), "--model", "bi", "--target", target, "--save", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "seq 0 (T=5)" in printed and "seq 1 (T=9)" in printed and f"saved {out}" in printed
    saved = np.load(out)
    for i, x in enumerate(seqs.values()):
        want = reference(encoders["bi"], x[None], np.array([len(x)], np.int64))
        assert np.abs(saved[f"seq{i}_y"] - want["y"][0]).max() <= TOL
        assert np.abs(saved[f"seq{i}_h_n"] - want["h_n"][:, 0]).max() <= TOL
    # .json input, one output, an explicit model version
    (tmp_path / "seqs.json").write_text(json.dumps([seqs["a"].tolist()]))
    code = client_main(
        [str(tmp_path / "seqs.json"), "--model", "bi", "--target", target, "--outputs", "h_n", "--model-version", "1"]
    )
    printed = capsys.readouterr().out
    assert code == 0 and printed.startswith("seq 0 (T=5): h_n shape=[4, 8] mean=") and " y " not in printed
    # a server-side refusal: exit code 1 and the gRPC status on one line
    code = client_main([str(tmp_path / "seqs.npz"), "--model", "no_such_model", "--target", target])
    out_text, err = capsys.readouterr()
    assert code == 1 and err.startswith("error: NOT_FOUND: ") and "no_such_model" in err and err.count("\n") == 1
