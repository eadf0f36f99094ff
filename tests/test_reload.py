"""Saved PPA models reload as PPA, and bad settings fail while loading (tiny random models saved to tmp_path)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel

import ppa_hf
from conftest import subprocess_env
from ppa_hf.models import tiny_config

SETTINGS = {"ppa_p": 0.25, "ppa_window": 4, "ppa_sink_tokens": 1}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A plain tiny Llama and the same weights saved after loading with PPA settings."""
    root = tmp_path_factory.mktemp("reload")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(root / "plain")
    AutoModelForCausalLM.from_pretrained(root / "plain", attn_implementation="ppa", **SETTINGS).save_pretrained(
        root / "ppa")
    return root


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


IDS = torch.randint(0, 100, (2, 48), generator=torch.Generator().manual_seed(1))


def test_saved_config_records_the_attention(folders):
    saved = json.loads((folders / "ppa" / "config.json").read_text())
    assert saved["attn_implementation"] == "ppa"
    assert {k: saved[k] for k in SETTINGS} == SETTINGS


def test_reload_without_naming_an_attention_runs_ppa(folders):
    explicit = AutoModelForCausalLM.from_pretrained(folders / "ppa", attn_implementation="ppa")
    reloaded = AutoModelForCausalLM.from_pretrained(folders / "ppa")
    assert reloaded.config._attn_implementation == "ppa"
    assert torch.equal(logits(reloaded, IDS), logits(explicit, IDS))
    sdpa = AutoModelForCausalLM.from_pretrained(folders / "plain", attn_implementation="sdpa")
    assert not torch.allclose(logits(reloaded, IDS), logits(sdpa, IDS), atol=1e-3)  # p=0.25, w=4: not full


def test_folder_saved_without_the_attention_entry_runs_ppa(folders, tmp_path):
    """What earlier releases saved: the ppa_* settings and no attn_implementation."""
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folders / "ppa" / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["attn_implementation"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "ppa"
    explicit = AutoModelForCausalLM.from_pretrained(folders / "ppa", attn_implementation="ppa")
    assert torch.equal(logits(reloaded, IDS), logits(explicit, IDS))


def test_explicit_sdpa_still_gives_sdpa_and_is_kept_on_save(folders, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folders / "ppa", attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    plain = AutoModelForCausalLM.from_pretrained(folders / "plain", attn_implementation="sdpa")
    assert torch.equal(logits(model, IDS), logits(plain, IDS))
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_apply_then_save_reloads_as_ppa(folders, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folders / "plain")
    ppa_hf.apply(model, p=0.5, window=8)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "ppa" and reloaded.config.ppa_p == 0.5
    assert torch.equal(logits(reloaded, IDS), logits(model, IDS))


def test_without_import_ppa_hf_transformers_refuses_the_folder(folders):
    """Transformers alone does not know "ppa": loading fails instead of running sdpa; naming sdpa loads."""
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "try:\n"
        "    AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "except ValueError as err:\n"
        "    print('REFUSED', err)\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation='sdpa')\n"
        "print('NAMED', model.config._attn_implementation, 'ppa_hf' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(folders / "ppa")], capture_output=True, text=True,
                         env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'REFUSED Specified `attn_implementation="ppa"` is not supported' in out.stdout
    assert "NAMED sdpa False" in out.stdout


@pytest.mark.parametrize("kwargs,pattern", [
    ({"ppa_p": 1.5}, r"ppa_p=1\.5 is outside the allowed range; ppa_p must be a real number in \[0, 1\]"),
    ({"ppa_p": 0.5, "ppa_window": 0}, r"ppa_window=0 is outside the allowed range; ppa_window must be an integer >= 1"),
    ({"ppa_p": 0.5, "ppa_sink_tokens": -1}, r"ppa_sink_tokens=-1 is outside the allowed range; ppa_sink_tokens must"),
    ({"ppa_p": [0.5, 0.5, 0.5]}, r"ppa_p has 3 values but the model has 2 layers"),
    ({"ppa_p": 0.5, "ppa_backend": "cuda"}, r"ppa_backend='cuda' is not allowed"),
    ({"ppa_p": 0.5, "ppa_granularity": "tile"}, r"ppa_granularity='tile' is not allowed"),
    ({"ppa_p": 0.5, "ppa_block_size": 0}, r"ppa_block_size=0 is outside"),
])
def test_bad_settings_fail_in_from_pretrained(folders, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        AutoModelForCausalLM.from_pretrained(folders / "plain", attn_implementation="ppa", **kwargs)


def test_bad_value_in_config_json_fails_the_load(folders, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folders / "ppa" / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["ppa_window"] = -3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"ppa_window=-3 is outside"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_bad_value_set_on_a_config_fails_at_once():
    config = tiny_config("llama")
    with pytest.raises(ValueError, match=r"ppa_p=2\.0 is outside"):
        config.ppa_p = 2.0
    assert config.ppa_p is None


def test_encoder_fails_in_from_pretrained(tmp_path):
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"BertConfig describes a bidirectional encoder.*non-causal"):
        BertModel.from_pretrained(tmp_path, attn_implementation="ppa", ppa_p=0.5)
    assert BertModel.from_pretrained(tmp_path).config._attn_implementation == "sdpa"  # no PPA settings: untouched
