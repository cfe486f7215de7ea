"""open_clip's side of tests/test_from_open_clip.py, run in a process of its own (PyTorch never sits beside JAX).

  python tests/open_clip_reference.py OUT_DIR

Reads ``OUT_DIR/model_config.json`` (an open_clip model config), ``OUT_DIR/captions.json`` and
``OUT_DIR/images.npy`` (uint8 NHWC); builds the model with random weights (``pretrained=None``),
sets its temperature to 1/50, and writes
  ``tiny.pt``          a training checkpoint as open_clip writes one ({"epoch", "state_dict"} with
                       DistributedDataParallel's ``module.`` prefixes)
  ``tokens.npy``       open_clip's tokenizer on the captions
  ``embeddings.npz``   ``image`` and ``text``: normalised embeddings of the images (CLIP's pixel
                       normalisation) and of the tokens
  ``state_dict.npz``   the model's state dict as numpy arrays (for tests that need no PyTorch)
"""

import json
import math
import os
import sys

import numpy as np
import open_clip
import torch


def main(out_dir: str) -> None:
  torch.manual_seed(0)
  name = "ccmr-test-tiny-clip"
  config_folder = os.path.join(out_dir, "registered")
  os.makedirs(config_folder, exist_ok=True)
  with open(os.path.join(out_dir, "model_config.json"), encoding="utf-8") as f:
    config = json.load(f)
  with open(os.path.join(config_folder, f"{name}.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  open_clip.add_model_config(config_folder)
  model = open_clip.create_model(name, pretrained=None).eval()
  with torch.no_grad():
    model.logit_scale.fill_(math.log(50.0))
  state = {f"module.{key}": value for key, value in model.state_dict().items()}
  torch.save({"epoch": 1, "name": name, "state_dict": state}, os.path.join(out_dir, "tiny.pt"))
  np.savez(os.path.join(out_dir, "state_dict.npz"), **{k: v.numpy() for k, v in model.state_dict().items()})

  with open(os.path.join(out_dir, "captions.json"), encoding="utf-8") as f:
    captions = json.load(f)
  tokens = open_clip.get_tokenizer(name)(captions)
  np.save(os.path.join(out_dir, "tokens.npy"), tokens.numpy())

  pixels = torch.from_numpy(np.load(os.path.join(out_dir, "images.npy"))).permute(0, 3, 1, 2).float() / 255.0
  mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
  with torch.no_grad():
    image = model.encode_image((pixels - mean) / std, normalize=True).numpy()
    text = model.encode_text(tokens, normalize=True).numpy()
  np.savez(os.path.join(out_dir, "embeddings.npz"), image=image, text=text)


if __name__ == "__main__":
  main(sys.argv[1])
