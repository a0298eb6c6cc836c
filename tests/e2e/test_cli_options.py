"""How the CLI finds and dials the controller (target from the environment, TLS flags, a named
unreachable controller), ultralytics' key=value arguments, and `bench` measuring the processes
that serve the ports it was pointed at."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest

from inferline.common.errors import Overloaded
from inferline.common.settings import Settings
from inferline.services.cli import build_parser, detect, keyvalue, main, procs, shared
from tests.support.pki import make_pki
from tests.support.servers import LoopThread, start_stage
from tests.support.standins import STANDIN_PINS


def _resolved_target(*argv: str) -> str:
    args = build_parser().parse_args(["models", *argv])
    return shared.target(args, shared.settings(args))


def test_target_defaults_to_this_hosts_controller_port(monkeypatch):
    monkeypatch.delenv("INFERLINE_CONTROLLER_TARGET", raising=False)
    monkeypatch.setenv("INFERLINE_CONTROLLER_PORT", "28123")
    assert _resolved_target() == "localhost:28123"
    monkeypatch.setenv("INFERLINE_CONTROLLER_TARGET", "127.0.0.1:28124")
    assert _resolved_target() == "127.0.0.1:28124"
    assert _resolved_target("--target", "127.0.0.1:28125") == "127.0.0.1:28125"


def test_detect_without_target_dials_the_port_in_the_environment(stack, data_dir, monkeypatch, capsys):
    monkeypatch.delenv("INFERLINE_CONTROLLER_TARGET", raising=False)
    monkeypatch.setenv("INFERLINE_CONTROLLER_PORT", stack.controller.rpartition(":")[2])
    assert main(["detect", str(data_dir / "shapes_01.jpg")]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["detections"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_controller_is_named_with_advice_and_no_traceback(data_dir, capsys):
    target = f"127.0.0.1:{_free_port()}"
    code = main(["detect", "--target", target, str(data_dir / "shapes_01.jpg"), "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot reach the controller at {target}" in err and "inferline up" in err
    assert "Traceback" not in err


def test_a_missing_tls_file_is_named_by_its_flag(data_dir, tmp_path, capsys):
    code = main(["detect", "--tls-ca", str(tmp_path / "nope.crt"), str(data_dir / "shapes_01.jpg")])
    assert code == 1 and f"--tls-ca {tmp_path / 'nope.crt'}: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_the_tls_flags_dial_a_mutual_tls_controller(model_dir, data_dir, tmp_path, capsys):
    pki = make_pki(tmp_path)
    served = dataclasses.replace(
        Settings(),
        model_dir=(model_dir,),
        models=("yolov8n",),
        trusted_weights=STANDIN_PINS,
        tls_cert_file=pki["cert"],
        tls_key_file=pki["key"],
        tls_ca_file=pki["ca"],
    )
    loop = LoopThread()
    servers = {stage: start_stage(loop, stage, served) for stage in ("preprocess", "inference", "postprocess")}
    servers["controller"] = start_stage(
        loop, "controller", dataclasses.replace(served, **{f"{s}_target": servers[s].address for s in servers})
    )
    target = f"localhost:{servers['controller'].address.rpartition(':')[2]}"
    try:
        image = str(data_dir / "shapes_01.jpg")
        plaintext = main(["detect", "--target", target, image, "--timeout", "10"])
        assert plaintext == 1
        capsys.readouterr()
        flags = ["--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])]
        assert main(["detect", "--target", target, image, *flags]) == 0
        assert json.loads(capsys.readouterr().out)["results"][0]["detections"]
    finally:
        for server in reversed(list(servers.values())):
            server.stop()
        loop.close()


def test_key_value_arguments_become_the_subcommands_flags():
    parser = build_parser()
    argv = [
        "detect",
        "source=a.jpg",
        "imgsz=640",
        "save_txt=True",
        "save_conf=False",
        "classes=[0, 2]",
        "--labels",
        "x=y",
        "x=y.jpg",
        "agnostic_nms=true",
    ]
    assert keyvalue.as_flags(parser, argv) == [
        "detect",
        "a.jpg",
        "--imgsz",
        "640",
        "--save-txt",
        "--classes",
        "0",
        "2",
        "--labels",
        "x=y",
        "x=y.jpg",
        "--agnostic-nms",
    ]
    assert keyvalue.as_flags(parser, ["detect", "classes=0", "source=x.jpg"]) == ["detect", "x.jpg", "--classes", "0"]
    with pytest.raises(SystemExit):
        keyvalue.as_flags(parser, ["detect", "save_txt=maybe"])


def test_the_process_listening_on_a_port_is_found_from_proc():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert procs.listening_pids([port]) == {port: os.getpid()}
        assert procs.stage_pids({"controller": f"localhost:{port}", "inference": "10.1.2.3:50053"}) == {
            "controller": os.getpid()
        }
    assert procs.listening_pids([port]) == {}


def test_bench_measures_the_processes_serving_its_ports(stack, data_dir, capsys):
    ports = [
        f"{stage}={stack.servers[stage].address.rpartition(':')[2]}"
        for stage in ("preprocess", "inference", "postprocess")
    ]
    code = main(
        [
            "bench",
            "--target",
            stack.controller,
            "--images",
            str(data_dir / "shapes_01.jpg"),
            "--duration",
            "1",
            "--warmup",
            "0",
            "--concurrency",
            "1",
            "--json",
            *[a for p in ports for a in ("--port", p)],
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(report["rss_mb"]) == {"controller", "preprocess", "inference", "postprocess"}


class _Refusing:
    """A client that refuses for load ``times`` times, then answers."""

    def __init__(self, times: int, hint: float | None):
        self.times, self.hint, self.calls = times, hint, 0

    def detect(self, request):
        self.calls += 1
        if self.calls <= self.times:
            raise Overloaded("busy", retry_after_s=self.hint)
        return "answered"


def test_frames_refused_for_load_are_sent_again_after_the_hint():
    client = _Refusing(times=2, hint=0.01)
    assert detect.detect_retrying(client, None, retry_for_s=5) == "answered" and client.calls == 3
    with pytest.raises(Overloaded):
        detect.detect_retrying(_Refusing(times=100, hint=0.05), None, retry_for_s=0.2)


def test_the_installed_command_takes_key_value_arguments_and_prints_no_traceback(data_dir):
    """As a user types it (sys.argv, a new process), against a controller that is not there."""
    image = data_dir / "shapes_01.jpg"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "inferline.services.cli",
            "detect",
            f"source={image}",
            "conf=0.3",
            f"target=127.0.0.1:{_free_port()}",
            "timeout=5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot reach the controller" in done.stderr and "Traceback" not in done.stderr
