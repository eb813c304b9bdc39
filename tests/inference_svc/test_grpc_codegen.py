"""The stub generator: committed stubs match the protos, and `--check` names what is stale."""

from pathlib import Path

from loraserve import codegen


def test_committed_stubs_are_up_to_date():
    assert codegen.main(["--check"]) == 0


def write_proto(protos: Path, name: str, body: str) -> None:
    path = protos / "toy" / "v1" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'syntax = "proto3";\npackage toy.v1;\n{body}\n')


def test_check_names_changed_missing_and_orphaned_files(tmp_path):
    protos = tmp_path / "protos"
    write_proto(protos, "a.proto", "message A {}")
    write_proto(protos, "b.proto", "message B {}\nservice S { rpc Get(B) returns (B); }")
    written = codegen.generate(tmp_path, protos)  # the "committed" state
    v1 = Path("toy/v1")
    assert {v1 / "__init__.py", v1 / "a_pb2.py", v1 / "a_pb2.pyi", v1 / "b_pb2_grpc.py"} <= set(written)
    assert codegen.stale_files(tmp_path, protos) == {}

    write_proto(protos, "a.proto", "message A { int32 x = 1; }")
    write_proto(protos, "c.proto", "message C {}")
    (protos / "toy" / "v1" / "b.proto").unlink()
    stale = codegen.stale_files(tmp_path, protos)
    assert stale[v1 / "a_pb2.py"] == "differs"
    assert stale[v1 / "c_pb2.py"] == "missing"
    assert stale[v1 / "b_pb2.py"] == stale[v1 / "b_pb2_grpc.py"] == "orphan"
    assert v1 / "__init__.py" not in stale
