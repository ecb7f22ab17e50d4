"""--chat: a column of chat messages is rendered with the tokenizer's chat template, as the model was trained on it."""

import json
import shutil

from typer.testing import CliRunner

from cli.main import app
from gradindex.search import GradIndex
from tiny import build_args, word_tokenizer

runner = CliRunner()
TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
CHATS = [[{"role": "user", "content": "the capital city"}, {"role": "assistant", "content": "of the north"}],
         [{"role": "user", "content": "who wrote the book"}, {"role": "assistant", "content": "an old author"}]] * 10


def _workspace(ws, tmp_path, template=TEMPLATE):
    model = tmp_path / "model"
    shutil.copytree(ws / "model", model)
    tok = word_tokenizer()
    tok.chat_template = template
    tok.save_pretrained(model)
    return model


def _build(ws, tmp_path, model, rows, *extra):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    args = build_args(ws, tmp_path / "idx", "--chat", "--text-field", "messages", *extra)
    args[args.index("build") + 1], args[args.index("--data") + 1] = str(model), str(data)
    args[args.index("--factors"):args.index("--factors") + 2] = []  # fitted here, on the rendered chats
    return runner.invoke(app, args)


def test_chat_messages_are_rendered_with_the_chat_template(ws, tmp_path):
    result = _build(ws, tmp_path, _workspace(ws, tmp_path), CHATS)
    assert result.exit_code == 0, result.output
    index = GradIndex.open(tmp_path / "idx")
    assert index.manifest.build.chat
    assert index.reader.rows([0, 1], ("text",))["text"] == ["user the capital city assistant of the north ",
                                                            "user who wrote the book assistant an old author "]
    fitted = runner.invoke(app, ["fit", str(tmp_path / "model"), "--data", str(tmp_path / "chats.jsonl"), "--chat",
                                 "--text-field", "messages", "--out", str(tmp_path / "factors")])
    assert fitted.exit_code == 0, fitted.output


def test_bad_chat_rows_and_a_missing_template_are_one_line_errors(ws, tmp_path):
    model = _workspace(ws, tmp_path)
    bad = _build(ws, tmp_path, model, [CHATS[0], "just text"])
    assert bad.exit_code == 2 and "row 1 of 'messages' is not a list of {role, content} messages" in bad.output
    assert [line for line in bad.output.splitlines() if "error" in line] == [bad.output.strip().splitlines()[-1]]
    plain = tmp_path / "plain"
    shutil.copytree(ws / "model", plain)
    missing = _build(ws, tmp_path, plain, CHATS)
    assert missing.exit_code == 2 and "has no chat template" in missing.output
