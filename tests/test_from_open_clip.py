"""Start from CLIP: open_clip checkpoints converted into the dual encoder, CLIP's tokenizer, a flickr_clip run.

open_clip (PyTorch) runs in a subprocess (tests/open_clip_reference.py) that builds a tiny CLIP with
random weights, saves its checkpoint and writes its tokens and embeddings; the converter runs as
its command; the comparisons run here.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from ccmr_jax import experiment, pretrain
from ccmr_jax.cli import UserError
from ccmr_jax.data import prepare
from ccmr_jax.data.clip_tokenizer import ClipTokenizer
from ccmr_jax.data.tokenizer import tokenizer_from_json
from ccmr_jax.models import from_open_clip, weights
from ccmr_jax.models.dual_encoder import build_model
from configs import flickr_clip
from fake_flickr30k import write_fake_flickr30k

HERE = os.path.dirname(os.path.abspath(__file__))
# A tiny CLIP in open_clip's config format: 2 heads of 32 in the image tower (not open_clip's default
# head width of 64), 4 heads in the text tower, QuickGELU, the real 49,408-id vocabulary and 77 tokens.
TINY = {"embed_dim": 24, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
CAPTIONS = [
    "A dog runs on the beach!", "Two MEN, wearing hats; play chess...", "  spaces\tand\nnewlines  ",
    "\u201cCurly quotes\u201d, caf\u00e9 &amp; cr\u00e8me br\u00fbl\u00e9e", "don't they'll we've I'm he'd it's",
    "numbers 12345 and 3.14", "!!! ! ?", "hey!~ a!$ (id 0 is '!' inside a piece)",
    "emoji \U0001F600 and \u4e2d\u6587", "<START_OF_TEXT> inside",
    "", " ".join(["a very long caption about a dog and a cat on the street"] * 12)]


def _run(args, **kwargs):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=os.path.dirname(HERE),
                        timeout=600, **kwargs)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The tiny CLIP's files from open_clip, and its conversion: a dict of paths and the converter's output."""
  folder = tmp_path_factory.mktemp("open_clip")
  (folder / "model_config.json").write_text(json.dumps(TINY))
  (folder / "captions.json").write_text(json.dumps(CAPTIONS))
  np.save(folder / "images.npy", np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
  reference = _run([os.path.join(HERE, "open_clip_reference.py"), str(folder)])
  assert reference.returncode == 0, reference.stderr[-3000:]
  out = str(folder / "tiny.npz")
  command = _run(["-m", "ccmr_jax.models.from_open_clip", "--model=ccmr-test-tiny-clip",
                  f"--model_config={folder / 'model_config.json'}", f"--checkpoint={folder / 'tiny.pt'}",
                  f"--out={out}"])
  assert command.returncode == 0, command.stderr[-3000:]
  return {"folder": folder, "npz": out, "stdout": command.stdout}


def test_clip_tokenizer_gives_open_clips_tokens(converted):
  expected = np.load(converted["folder"] / "tokens.npy")
  ours = ClipTokenizer.load("", 77)
  np.testing.assert_array_equal(ours.encode(CAPTIONS), expected)
  assert ours.vocab_size == 49408 and (expected[-1] != 0).all()  # the long caption fills all 77 tokens
  assert 0 in expected[7][2:7]  # a padding id inside a caption: the text tower must not stop there
  assert tokenizer_from_json(ours.to_json()) == ours


def test_converted_towers_embed_like_open_clip(converted):
  arch = from_open_clip.read_converted(converted["npz"])
  assert (arch.vision_heads, arch.text_heads, arch.activation) == (2, 4, "quick_gelu")
  assert "fine-tune it with" in converted["stdout"] and "--config.model.vit.heads=2" in converted["stdout"]
  model = build_model(arch.model_config(), arch.vocab_size, arch.context_length)
  images = np.load(converted["folder"] / "images.npy")
  tokens = ClipTokenizer.load("", arch.context_length).encode(CAPTIONS)
  variables = model.init(jax.random.PRNGKey(1), images[:1], tokens[:1])
  params = weights.load_encoder_weights(variables, converted["npz"])
  image_emb, text_emb, scale = jax.jit(model.apply)(params, images, tokens)
  expected = np.load(converted["folder"] / "embeddings.npz")
  np.testing.assert_allclose(np.asarray(image_emb), expected["image"], atol=1e-5)
  np.testing.assert_allclose(np.asarray(text_emb), expected["text"], atol=1e-5)
  assert float(scale) == pytest.approx(50.0, rel=1e-6)


def test_safetensors_read_without_torch_and_bad_checkpoints_are_named(converted, tmp_path):
  with np.load(converted["folder"] / "state_dict.npz") as archive:
    state = {key: archive[key] for key in archive.files}
  save_file(state, str(tmp_path / "tiny.safetensors"))
  read, openai = from_open_clip.read_checkpoint(str(tmp_path / "tiny.safetensors"))
  assert not openai and set(read) == set(state)
  config = from_open_clip.named_model_config("x", str(converted["folder"] / "model_config.json"))
  arch = from_open_clip.read_architecture(read, config, "auto")
  assert arch == from_open_clip.read_converted(converted["npz"])
  with pytest.raises(ValueError, match="vision_width: checkpoint 64, model config 768"):
    from_open_clip.read_architecture(read, from_open_clip.named_model_config("ViT-B-32"), "auto")
  damaged = {k: v for k, v in read.items() if k != "ln_final.bias"}
  damaged["visual.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"missing: \['ln_final.bias'\]\n  unexpected: \['visual.extra.weight'\]"):
    from_open_clip.params_from_state_dict(damaged, arch)
  with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
    from_open_clip.named_model_config("ViT-Q-99")


def test_converter_command_names_a_wrong_model(converted, tmp_path):
  command = _run(["-m", "ccmr_jax.models.from_open_clip", "--model=ViT-B-16",
                  f"--checkpoint={converted['folder'] / 'tiny.pt'}", f"--out={tmp_path / 'x.npz'}"])
  assert command.returncode == 2
  assert "error: the checkpoint is not the named model" in command.stderr
  assert "patch: checkpoint 8, model config 16" in command.stderr and not (tmp_path / "x.npz").exists()


LAYOUT = [("train", "animals")] * 8 + [("train", "street")] * 8 + [("val", "animals"), ("val", "street"),
                                                                    ("test", "animals"), ("test", "street")]


def tiny_flickr_clip_config(data_dir: str, cache_dir: str, npz: str):
  """configs/flickr_clip.py with the tiny converted CLIP (set as a user would, from its architecture)."""
  config = flickr_clip.get_config("ViT-B-32")
  arch = from_open_clip.read_converted(npz)
  config.model.update(init_from=npz, embed_dim=arch.embed_dim, dtype="float32")
  config.model.vit.update(patch=8, width=64, depth=2, heads=2, activation="quick_gelu")
  config.model.causal_transformer.update(width=32, depth=2, heads=4, activation="quick_gelu")
  config.data.update(tfds_data_dir=data_dir, cache_dir=cache_dir, num_tasks=2, image_size=32, stored_size=32)
  config.train.update(batch_size=8, epochs_per_task=1, warmup_steps=1, log_every=1)
  config.eval.batch_size = 8
  return config


def test_a_wrong_architecture_in_the_config_is_named(converted):
  config = flickr_clip.get_config("ViT-B-32")
  config.model.init_from = converted["npz"]
  with pytest.raises(UserError, match=r"model.vit.heads: checkpoint 2, config 12(.|\n)*"
                                      r"image size \(data.image_size\): checkpoint 32, config 224"):
    pretrain.initial_weights(config)


def test_one_flickr_clip_training_step_from_the_converted_checkpoint(converted, tmp_path):
  manual_dir = write_fake_flickr30k(str(tmp_path / "manual"), LAYOUT)
  prepare.prepare("flickr30k", str(tmp_path / "tfds"), manual_dir)
  config = tiny_flickr_clip_config(str(tmp_path / "tfds"), str(tmp_path / "cache"), converted["npz"])
  results = experiment.run(config, str(tmp_path / "work"))
  assert results["tasks_trained"] == 2 and results["tasks"][0]["counts"]["train"]["images"] == 8
  assert len(results["zero_shot"]["mean_r1"]) == 2
  assert json.loads((tmp_path / "work" / "tokenizer.json").read_text())["kind"] == "clip_bpe"
  assert None not in results["policies"]["reindex"]["mean_r1"]["matrix"][1]
