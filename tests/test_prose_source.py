"""English prose for the demo mix: ``pydoc:topics`` is one document per reference-manual topic, ``dir/*`` takes
suffix-less files once each (links skipped) and skips an absent directory, and the demo mix has the prose source."""

import logging
from pathlib import Path
from pydoc_data.topics import topics

from omegaconf import OmegaConf

from nemo_plugins.data.text_files import iter_documents, piece_documents, split_pieces


def test_pydoc_topics_are_one_document_per_topic_equal_to_the_imported_module():
    documents = list(iter_documents(["pydoc:topics"]))
    assert [name.rsplit(":", 1)[1] for name, _ in documents] == [k for k, v in topics.items() if v.strip()]
    assert [text for _, text in documents] == [v for v in topics.values() if v.strip()]
    assert all("topics = {" not in text for _, text in documents)  # the texts, not the module's source


def test_a_star_directory_takes_suffix_less_files_once_and_an_absent_one_is_skipped(tmp_path, caplog):
    licences = tmp_path / "licences"
    licences.mkdir()
    (licences / "GPL-3").write_text("GNU GENERAL PUBLIC LICENSE\n")
    (licences / "BSD").write_text("Redistribution and use in source and binary forms\n")
    (licences / "GPL").symlink_to(licences / "GPL-3")
    with caplog.at_level(logging.WARNING):
        documents = list(iter_documents([f"{licences}/*", f"{tmp_path}/absent/*"]))
    assert sorted(Path(name).name for name, _ in documents) == ["BSD", "GPL"]  # GPL-3 is the link's target
    assert "absent" in caplog.text and "skipped" in caplog.text
    assert list(iter_documents([str(licences), "pydoc:topics"]))[0][0].endswith(":assert")  # no suffix, no star: none


def test_pieces_of_prose_hold_every_document_once_in_order(tmp_path):
    (tmp_path / "a").write_text("one")
    (tmp_path / "b").write_text("two")
    paths = ["pydoc:topics", f"{tmp_path}/*"]
    pieces = [piece for part in split_pieces(paths, 3) for piece in part]
    assert [d for piece in pieces for d in piece_documents(piece)] == list(iter_documents(paths))


def test_the_demo_mix_has_prose_as_its_own_source():
    sources = {s.name: list(s.paths) for s in OmegaConf.load(Path(__file__).parents[1] / "conf/data/demo.yaml").sources}
    assert sources["prose"] == ["pydoc:topics", "/usr/share/common-licenses/*"]
    assert not any("pydoc" in path for name, paths in sources.items() if name != "prose" for path in paths)
