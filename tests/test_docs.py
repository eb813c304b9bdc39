"""README's reference tables are generated from the code (`python -m entrypoints.docs`) and must be
current: a config field or metric added without regenerating them fails here."""

from pathlib import Path

from entrypoints import docs

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tables_are_current(capsys):
    assert docs.main(["--check"]) == 0, capsys.readouterr().err


def test_a_stale_table_is_named(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text().replace("| `--max-loras` |", "| `--max-loras-old` |"))
    assert docs.main(["--check", "--readme", str(readme)]) == 1
    assert "stale generated tables: engine-config" in capsys.readouterr().err
    assert docs.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == README.read_text()


def test_every_engine_config_field_has_a_row():
    from inference_svc.config import EngineConfig

    text = README.read_text()
    for name in EngineConfig.__dataclass_fields__:
        assert f"| `--{name.replace('_', '-')}` |" in text, name
