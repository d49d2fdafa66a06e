"""Text side: tokenizer loading, caption layout (reference 2.2), prompt templates (2.3)."""

import os
import time

import numpy as np
import pytest

from signclip_jax.data import text
from signclip_jax.data.text import (
    PROMPT_TEMPLATES,
    bundled_minilm_path,
    encode_text,
    encode_texts,
    load_tokenizer,
    render_prompt,
    resolve_text_model,
)
from signclip_jax.errors import UserError

MADE_UP_HUB_NAME = "signclip-jax-tests/no-such-model-7f3a"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("minilm")


def test_bundled_minilm_folder():
    path = bundled_minilm_path()
    for name in ("config.json", "vocab.txt"):
        assert os.path.exists(os.path.join(path, name))


def test_resolve_text_model(tmp_path):
    assert resolve_text_model("minilm") == bundled_minilm_path()
    assert resolve_text_model("BUNDLED") == bundled_minilm_path()
    assert resolve_text_model(str(tmp_path)) == str(tmp_path)
    assert resolve_text_model("bert-base-cased") == "bert-base-cased"
    assert resolve_text_model("google-bert/bert-base-cased") == "google-bert/bert-base-cased"
    with pytest.raises(UserError, match="does not exist"):
        resolve_text_model(str(tmp_path / "missing"))
    with pytest.raises(UserError):
        resolve_text_model("  ")


def test_encode_text_layout(tok):
    caption = "<en> <ase> house"
    pieces = tok(caption, add_special_tokens=False)["input_ids"]
    ids, mask = encode_text(tok, caption)
    assert ids.shape == mask.shape == (63,)
    assert ids.dtype == np.int32 and mask.dtype == bool
    n = len(pieces)
    assert ids[0] == tok.cls_token_id
    assert list(ids[1 : n + 1]) == pieces
    assert ids[n + 1] == tok.sep_token_id
    assert (ids[n + 2 :] == 0).all()
    assert mask[: n + 2].all() and not mask[n + 2 :].any()
    # the tags are plain text, split by the basic tokenizer, not special tokens
    assert tok.convert_ids_to_tokens(pieces[:3]) == ["<", "en", ">"]


def test_encode_text_truncates_to_61_pieces(tok):
    caption = " ".join(f"word{i}" for i in range(80))
    pieces = tok(caption, add_special_tokens=False)["input_ids"]
    assert len(pieces) > 61
    ids, mask = encode_text(tok, caption, max_len=64)
    assert list(ids[1:62]) == pieces[:61]
    assert ids[62] == tok.sep_token_id and ids[0] == tok.cls_token_id
    assert mask.all()
    ids8, _ = encode_text(tok, caption, max_len=8)
    assert ids8.shape == (7,) and list(ids8[1:6]) == pieces[:5] and ids8[6] == tok.sep_token_id


def test_encode_empty_text(tok):
    ids, mask = encode_text(tok, "")
    assert list(ids[:2]) == [tok.cls_token_id, tok.sep_token_id]
    assert mask.sum() == 2


def test_encode_texts_matches_single(tok):
    texts = ["<en> <ase> house", "", "a much longer caption about signing " * 10, "Hello"]
    ids, mask = encode_texts(tok, texts, max_len=32)
    assert ids.shape == mask.shape == (4, 31)
    for i, t in enumerate(texts):
        one_ids, one_mask = encode_text(tok, t, max_len=32)
        np.testing.assert_array_equal(ids[i], one_ids)
        np.testing.assert_array_equal(mask[i], one_mask)
    empty_ids, empty_mask = encode_texts(tok, [])
    assert empty_ids.shape == (0, 63) and empty_mask.shape == (0, 63)


def test_prompt_templates():
    assert render_prompt("spreadthesign", text="house", spoken="en", signed="ase") == (
        "<en> <ase> house"
    )
    assert render_prompt("spreadthesign", text="Haus", spoken="de", signed="gsg") == (
        "<de> <gsg> Haus"
    )
    assert render_prompt("isolated", text="HOUSE", spoken="fr", signed="bfi") == "<en> <bfi> HOUSE"
    assert render_prompt("fingerspelling", text="SCH", signed_name="German Sign Language") == (
        "Fingerspell the letter SCH in German Sign Language."
    )
    assert render_prompt("plain", text="house") == "house"
    assert render_prompt("[{signed}] {text}!", text="x", signed="dsl") == "[dsl] x!"
    assert set(PROMPT_TEMPLATES) >= {"spreadthesign", "isolated", "fingerspelling", "plain"}


def test_prompt_nan_text_becomes_nan():
    assert render_prompt("spreadthesign", text=float("nan")) == "<en> <ase> nan"
    assert render_prompt("spreadthesign", text=None) == "<en> <ase> nan"
    assert render_prompt("plain", text=np.float64("nan")) == "nan"
    assert render_prompt("plain", text=3) == "3"


def test_prompt_unknown_field():
    with pytest.raises(UserError, match="unknown field"):
        render_prompt("<{language}> {text}", text="x")
    with pytest.raises(UserError):
        render_prompt("{} {text}", text="x")


def test_offline_hub_name_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        load_tokenizer(MADE_UP_HUB_NAME)
    message = str(err.value)
    assert MADE_UP_HUB_NAME in message and "cache" in message and "local folder" in message
    with pytest.raises(UserError, match="cache"):
        text.hub_file(MADE_UP_HUB_NAME, "config.json")
    assert time.monotonic() - start < 10


def test_unreachable_hub_fails_fast(monkeypatch):
    # Not flagged offline but no network: must not wait on the hub client's retries.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(text, "hub_offline", lambda: False)
    monkeypatch.setattr(text, "hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(UserError, match="not reachable"):
        load_tokenizer(MADE_UP_HUB_NAME)
    assert time.monotonic() - start < 10


def test_bad_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))


def test_normalize_gloss_as_the_original_islr_loaders():
    from signclip_jax.data.text import normalize_gloss

    assert normalize_gloss("HOUSE2", "asl_citizen") == "house"
    assert normalize_gloss("Ice_Cream12", "asl_citizen") == "ice_cream"
    assert normalize_gloss("ice_cream_2", "sem_lex") == "ice cream"
    assert normalize_gloss("ice_cream2", "sem_lex") == "ice cream2"  # HEAD: only "_<digits>"
    assert normalize_gloss("ice_cream_2", "sem_lex_paper") == "ice cream"
    assert normalize_gloss("ice_cream2", "sem_lex_paper") == "ice cream"
    assert normalize_gloss("HOUSE2", "none") == "HOUSE2"
    with pytest.raises(UserError, match="unknown gloss"):
        normalize_gloss("x", "bogus")


def test_pipeline_prompts_use_the_gloss_style():
    import ml_collections

    from signclip_jax.data import pipeline

    data = ml_collections.ConfigDict(
        {"prompt_template": "isolated", "gloss_style": "asl_citizen", "max_frames": 8}
    )
    settings = pipeline.settings_from_config(data)
    prep = pipeline._Prepare([], settings, None, seed=0, train=False)
    assert prep.prompt({"text": "HOUSE2", "sign_language": "ase"}) == "<en> <ase> house"
    data.gloss_style = "bogus"
    with pytest.raises(UserError, match="gloss_style"):
        pipeline.settings_from_config(data)


def test_loading_a_tokenizer_without_torch_prints_nothing():
    """The core install has no torch: transformers' "PyTorch was not found" advisory is noise
    on every command's stderr, and data/text.py drops it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from signclip_jax.data import text\n"
        "print(type(text.load_tokenizer('minilm')).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "Tokenizer" in r.stdout and "PyTorch was not found" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# The hub probe goes through the proxy settings (issue 18), on a fake proxy on loopback.


class _FakeProxy:
    """A loopback HTTP proxy that records each request line: CONNECT (https) is refused with
    403, a plain-http request is answered 200 (the proxy reached the 'hub' for the client)."""

    def __init__(self):
        import socket
        import threading

        self.seen: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                line = conn.recv(65536).split(b"\r\n")[0].decode()
                self.seen.append(line)
                status = "403 Forbidden" if line.startswith("CONNECT") else "200 OK"
                conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())

    def close(self):
        self.sock.close()


@pytest.fixture
def proxy(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    fake = _FakeProxy()
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_PROXY", "no_proxy", "ALL_PROXY",
              "all_proxy", "http_proxy", "https_proxy", "HF_ENDPOINT"):  # fmt: skip
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest set it at import
    monkeypatch.setenv("HTTPS_PROXY", fake.url)
    monkeypatch.setenv("HTTP_PROXY", fake.url)
    huggingface_hub.close_session()  # the hub's client reads the proxy settings when made
    yield fake
    huggingface_hub.close_session()
    fake.close()


def test_hub_probe_asks_the_proxy(proxy):
    # https endpoint: the probe asks the proxy to CONNECT (a raw TCP probe to port 443 would
    # not), and a refusing proxy means unreachable.
    assert text.hub_reachable(timeout=2) is False
    assert proxy.seen == ["CONNECT huggingface.co:443 HTTP/1.1"]


def test_hub_probe_reaches_the_hub_only_through_the_proxy(proxy, monkeypatch):
    import huggingface_hub

    # A name no resolver knows: only the proxy can answer, so True proves the probe used it.
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.signclip-test.invalid")
    assert text.hub_reachable(timeout=2) is True
    assert proxy.seen == ["HEAD http://hub.signclip-test.invalid/ HTTP/1.1"]
    # NO_PROXY for that host: the probe goes direct, the name does not resolve -> unreachable.
    monkeypatch.setenv("NO_PROXY", "hub.signclip-test.invalid")
    huggingface_hub.close_session()
    assert text.hub_reachable(timeout=2) is False
    assert len(proxy.seen) == 1


# ---------------------------------------------------------------------------------------------
# A staged text model in a remote folder (gs://): copied once per machine, loaded offline.


def _stage_minilm(folder):
    import shutil

    src = bundled_minilm_path()
    folder.mkdir(parents=True)
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), folder / name)
    return folder


def test_remote_text_model_is_fetched_once(tmp_path, monkeypatch):
    from etils import epath

    bucket = _stage_minilm(tmp_path / "bucket" / "models" / "minilm")
    reads = []

    def remote_dir(url):
        reads.append(url)
        assert url == "gs://bkt/models/minilm"
        return epath.Path(bucket)

    monkeypatch.setattr(text, "_remote_dir", remote_dir)
    monkeypatch.setenv("SIGNCLIP_TEXT_MODEL_CACHE", str(tmp_path / "cache"))
    local = resolve_text_model("gs://bkt/models/minilm")
    assert local == str(tmp_path / "cache" / "bkt_models_minilm")
    assert sorted(p.name for p in bucket.iterdir()) == sorted(
        n for n in os.listdir(local) if not n.startswith(".")
    )
    mtime = os.path.getmtime(os.path.join(local, "vocab.txt"))
    assert resolve_text_model("gs://bkt/models/minilm") == local  # cached: not copied again
    assert os.path.getmtime(os.path.join(local, "vocab.txt")) == mtime
    tok = load_tokenizer("gs://bkt/models/minilm")
    assert tok("house")["input_ids"] == load_tokenizer("minilm")("house")["input_ids"]
    # The remote folder changed: copied again.
    (bucket / "vocab.txt").write_text((bucket / "vocab.txt").read_text() + "extra\n")
    assert resolve_text_model("gs://bkt/models/minilm") == local
    assert (open(os.path.join(local, "vocab.txt")).read()).endswith("extra\n")
    assert not [n for n in os.listdir(tmp_path / "cache") if n.startswith(".")]  # no leftovers


def test_remote_text_model_without_config_is_a_user_error(tmp_path, monkeypatch):
    from etils import epath

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(text, "_remote_dir", lambda url: epath.Path(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"no config\.json.*prepare --text_model"):
        resolve_text_model("gs://bkt/models/none")
