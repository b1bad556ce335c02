"""Reference PyTorch models that pyxf converts (needs torch: `pip install torch`).

`TransformerSeq2Seq` is the original Transformer as PyTorch users build it: `torch.nn.Transformer`
(post-LN by default, `norm_first=True` for pre-LN, ReLU or GELU FFN, final encoder/decoder
LayerNorms), source and target `nn.Embedding`s scaled by sqrt(d_model), the fixed sinusoidal
positional encoding PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)),
and a linear output projection (optionally tied to the target embeddings). Train it as any
module, then

    model.save_pretrained("my-model")          # config.json (hyper-parameters) + model.pt (state_dict)
    # pyxf convert my-model my-model-pyxf      # or tools/convert.py
    m = pyxf.load("my-model-pyxf"); pyxf.translate(m, [[5, 6, 7]], beam_size=4)

A state_dict saved some other way converts too: `pyxf convert weights.pt OUT --config config.json`,
with the parameter names below and the hyper-parameters of `TransformerSeq2Seq.config`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from pyxf.seq2seq import sinusoidal_table

__all__ = ["TransformerSeq2Seq", "sinusoidal_table"]


class TransformerSeq2Seq(nn.Module):
    """Embeddings + positional encoding + torch.nn.Transformer (batch_first) + output projection.

    Parameter names (what the converter reads): src_embed.weight, tgt_embed.weight,
    transformer.{encoder,decoder}.layers.{i}.*, transformer.{encoder,decoder}.norm.*,
    generator.weight / generator.bias.
    """

    def __init__(self, src_vocab_size, tgt_vocab_size, d_model=512, nhead=8, num_encoder_layers=6,
                 num_decoder_layers=6, dim_feedforward=2048, dropout=0.1, activation="relu", norm_first=False,
                 layer_norm_eps=1e-5, max_len=512, tie_output=False, share_embeddings=False, pad_id=0, bos_id=1,
                 eos_id=2):
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError("activation must be 'relu' or 'gelu'")
        self.config = dict(
            architectures=["TransformerSeq2Seq"], model_type="pyxf-transformer",
            src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, d_model=d_model, nhead=nhead,
            num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward, dropout=dropout, activation=activation, norm_first=norm_first,
            layer_norm_eps=layer_norm_eps, max_len=max_len, tie_output=tie_output,
            share_embeddings=share_embeddings, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id,
        )
        self.d_model = d_model
        self.src_embed = nn.Embedding(src_vocab_size, d_model)
        self.tgt_embed = self.src_embed if share_embeddings else nn.Embedding(tgt_vocab_size, d_model)
        self.transformer = nn.Transformer(
            d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
            layer_norm_eps=layer_norm_eps, batch_first=True, norm_first=norm_first,
        )
        self.generator = nn.Linear(d_model, tgt_vocab_size)
        if tie_output:
            self.generator.weight = self.tgt_embed.weight
        self.register_buffer("pe", torch.from_numpy(sinusoidal_table(max_len, d_model)), persistent=False)

    def _embed(self, embedding, ids):
        return embedding(ids) * math.sqrt(self.d_model) + self.pe[: ids.shape[1]]

    def encode(self, src, src_padding_mask=None):
        """src: [batch, src_len] ids; src_padding_mask: [batch, src_len] bool, True at padding."""
        return self.transformer.encoder(self._embed(self.src_embed, src), src_key_padding_mask=src_padding_mask)

    def decode(self, tgt, memory, memory_padding_mask=None):
        """Logits [batch, tgt_len, tgt_vocab] for decoder inputs tgt (starting with bos)."""
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        out = self.transformer.decoder(self._embed(self.tgt_embed, tgt), memory, tgt_mask=mask, tgt_is_causal=True,
                                       memory_key_padding_mask=memory_padding_mask)
        return self.generator(out)

    def forward(self, src, tgt, src_padding_mask=None):
        return self.decode(tgt, self.encode(src, src_padding_mask), src_padding_mask)

    @torch.no_grad()
    def greedy(self, src, max_length, src_padding_mask=None):
        """Greedy decoding: [batch, <= max_length] new tokens (eos included where reached)."""
        memory = self.encode(src, src_padding_mask)
        bos, eos = self.config["bos_id"], self.config["eos_id"]
        tgt = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_length):
            next_token = self.decode(tgt, memory, src_padding_mask)[:, -1].argmax(-1)
            next_token = torch.where(done, torch.full_like(next_token, eos), next_token)
            tgt = torch.cat([tgt, next_token[:, None]], dim=1)
            done |= next_token == eos
            if done.all():
                break
        return tgt[:, 1:]

    def save_pretrained(self, directory):
        """config.json (the hyper-parameters) and model.pt (the state_dict), which `pyxf convert`
        reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        torch.save(self.state_dict(), directory / "model.pt")
        return directory
