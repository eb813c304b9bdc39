"""The adapter-root allow-list (`loraserve.adapter_paths`), and both of its callers: the replica's
LoadAdapter(path) here, the manager's RegisterAdapter(path) in
`tests/adapter_svc/test_registry_crud.py` and both over gRPC in
`tests/reliability/test_bad_input_corpus.py`."""

import shutil

import pytest

from inference_svc import errors as replica_errors
from inference_svc.servicer import InferenceServicer
from loraserve import errors
from loraserve.adapter_paths import resolve_adapter_dir

CONFIG, WEIGHTS, PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"


@pytest.fixture
def tree(tmp_path):
    """(root, {case: (path, error type, message fragment)}): one good adapter and every escape."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in (root / "good", outside / "adapter"):
        d.mkdir(parents=True)
        (d / CONFIG).write_text("{}")
        (d / WEIGHTS).write_bytes(b"weights")
    (root / "dir-link").symlink_to(outside / "adapter", target_is_directory=True)
    for name, linked in (("config-link", CONFIG), ("weights-link", WEIGHTS), ("pickle-link", PICKLE)):
        shutil.copytree(root / "good", root / name)
        (root / name / linked).unlink(missing_ok=True)
        (root / name / linked).symlink_to(outside / "adapter" / WEIGHTS)
    (root / "inner-link").symlink_to(root / "good", target_is_directory=True)
    refused = {
        "directory symlink out of the root": (root / "dir-link", errors.PathNotAllowed, "outside"),
        "config symlink out of the root": (root / "config-link", errors.PathNotAllowed, "outside"),
        "weights symlink out of the root": (root / "weights-link", errors.PathNotAllowed, "outside"),
        "pickle symlink out of the root": (root / "pickle-link", errors.PathNotAllowed, "outside"),
        "'..' out of the root": (f"{root}/../outside/adapter", errors.PathNotAllowed, "'..'"),
        "'..' back into the root": (f"{root}/good/../good", errors.PathNotAllowed, "'..'"),
        "absolute path outside the root": (outside / "adapter", errors.PathNotAllowed, "outside"),
        "relative path": ("root/good", errors.PathNotAllowed, "absolute"),
        "missing directory": (root / "nope", errors.AdapterFilesMissing, "does not exist"),
    }
    return root, refused


def test_paths_under_a_root_resolve_to_the_real_directory(tree):
    root, _ = tree
    assert resolve_adapter_dir(str(root / "good"), (root,)) == (root / "good").resolve()
    assert resolve_adapter_dir(str(root / "inner-link"), (str(root),)) == (root / "good").resolve()


@pytest.mark.parametrize(
    "case",
    [
        "directory symlink out of the root",
        "config symlink out of the root",
        "weights symlink out of the root",
        "pickle symlink out of the root",
        "'..' out of the root",
        "'..' back into the root",
        "absolute path outside the root",
        "relative path",
        "missing directory",
    ],
)
def test_every_escape_is_refused_by_the_function_and_the_replica(case, tree):
    root, refused = tree
    path, error_type, fragment = refused[case]
    with pytest.raises(error_type) as err:
        resolve_adapter_dir(str(path), (root,))
    assert fragment in str(err.value)
    assert str(err.value).startswith("path: ") or error_type is errors.AdapterFilesMissing
    with pytest.raises(error_type) as err:
        InferenceServicer(engine=None, adapter_roots=(root,))._allowed_path(str(path))
    assert fragment in str(err.value)


def test_no_root_refuses_everything(tree):
    root, _ = tree
    with pytest.raises(errors.PathNotAllowed, match="disabled"):
        resolve_adapter_dir(str(root / "good"), ())
    with pytest.raises(replica_errors.FailedPrecondition, match="disabled"):  # the replica's own code
        InferenceServicer(engine=None)._allowed_path(str(root / "good"))
