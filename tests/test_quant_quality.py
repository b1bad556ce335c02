"""Quality of quantized inference on a real checkpoint: SmolLM2-135M-Instruct (the default model,
fetched through pyxf.hub like the other real-checkpoint tests) against its float32 weights, on
1,025 tokens of English prose written for this file (TEXT below; nothing is downloaded for it).

Measured: top-1 next-token agreement with float32 over 1,024 positions and the text's perplexity.
The float32 reference is the GGUF's Q4_1 weights dequantized (the only copy of this model pyxf can
fetch). Numbers (pyxf; llama.cpp on the same weights and text, F32 perplexity 32.97 in both):

    format (embedding = head)   agreement  perplexity  llama.cpp, same weights
    int8 (int8)                 94.7%      +0.13%      -
    q8_0 (q8_0)                 94.8%      +0.79%      Q8_0: 95.1%, +0.58%
    q4_1 (q8_0)                 96.6%      +0.36%      Q4_1: 96.2%, +0.29%
    q4_0 (q8_0)                 67.4%      +26.3%      Q4_0: 67.1%, +26.2%
    GGUF kept (Q4_1, Q8_0 head) 96.6%      +0.36%      (the Q4_1 row: the same file)
    q6_k (q8_0)                 92.3%      +0.71%      -
    q4_k_m (q8_0)               84.8%      +4.96%      -
    Q4_K_M file, kept           84.0%      +4.56%      the same file: 84.6%, +4.34%
    Q5_K_M file, kept           81.2%      +10.6%      the same file: 82.0%, +10.1%
    Q6_K file, kept             92.6%      +1.11%      the same file: 92.8%, +0.50%

Every format quantizes what llama.cpp's quantizer does, the tied embedding/head included (at q8_0
for the formats below 8 bits: llama.cpp's q6_k does not fit this model's rows of 576).

K-quant rows: tools/bench_quant.py's files made by llama.cpp's quantizer and pyxf's own quantizer
(q6_k, the q4_k_m mix); SmolLM2's rows of 576 are not a multiple of 256, so most tensors get
llama.cpp's fallbacks, Q5_0 / Q5_1 / Q8_0. The 5-bit formats do worse than q4_1 here because the
float weights are themselves a 4-bit grid with a minimum, which q4_1 recovers exactly and the 5-bit
grids do not. The pyxf and llama.cpp columns of a file differ only by the rounding of activations,
which moves perplexity by a few tenths of a percent either way.

q4_1 re-quantizes Q4_1 weights and recovers their grid (to fp16 rounding), so only the 8-bit rounding of the
activations is left; q4_0 puts those Q4_1 values on a symmetric 4-bit grid, a second 4-bit rounding.

Agreement stops near 96% for 8-bit weights because this small model's next-token distributions are
flat (perplexity 33: a tenth of the positions have a top-1/top-2 logit gap under 0.12) and a 0.5%
weight error moves logits by ~0.1; llama.cpp shows the same. The bounds below sit just under these
measurements, so they catch regressions; the 99% agreement and 5% (q4_0) targets of the issue are
not reachable with these formats on this checkpoint (see the table). Run with -s to see the numbers.
"""

import re

import numpy as np
import pytest

import helpers
from pyxf import quant, quant_mix

_TEXT = """\
The old lighthouse on the northern cape had not been lit for nearly forty years, but the people of
the village still spoke of it as if it were keeping watch. Children dared one another to touch its
rusted door after dark, and fishermen, returning late with their nets, would glance up at the empty
lantern room out of habit. When a young engineer named Clara arrived in the spring with a toolbox, a
folding ladder and a letter from the regional council, nobody quite believed that she meant to make
it shine again.

She began by counting what was left. The stairs were sound, though the handrail wobbled on the upper
landings. The great glass lens, made of hundreds of carefully ground prisms, was dusty but unbroken,
which surprised her more than anything else. The clockwork that had once turned it was frozen solid
with old grease and salt. Clara spent three weeks taking the mechanism apart, cleaning each gear in
a bucket of paraffin and laying the pieces out on a canvas sheet in the order she had removed them.
In the evenings she sat in the harbour café, drawing diagrams in a notebook while the owner refilled
her cup without being asked.

Lighthouses belong to a long tradition of public engineering. The ancient lighthouse of Alexandria,
built in the third century before the common era, was counted among the wonders of the world and
guided ships into one of the busiest ports of the Mediterranean for more than a thousand years.
Medieval towers burned wood or coal in open braziers, which gave a weak and smoky light. The great
change came in the early nineteenth century, when the French physicist Augustin Fresnel designed a
lens made of concentric rings of glass. His design bent the scattered light of a single flame into a
narrow, powerful beam that could be seen more than twenty miles out at sea, and it used far less
material than a solid lens of the same size.

Modern navigation relies mostly on satellites, radio beacons and electronic charts, so one might ask
why anyone would bother to restore a lamp. The answer is partly practical and partly sentimental.
Electronic systems fail, batteries run down, and small boats do not always carry the latest
equipment. A visible light on a dangerous headland is simple, cheap to maintain and understood by
every sailor without training. It is also a landmark that gives a place its identity, in the same
way that a bell tower or a bridge does.

Economists sometimes use the lighthouse as an example of a public good. Once the light is burning,
every ship that passes benefits from it, and it is difficult to charge any single captain for the
service. For this reason many textbooks argued that lighthouses could only be built by governments.
Later historians pointed out that in England many lights were in fact financed privately, through
fees collected at nearby ports, which complicated the neat story. The debate is a useful reminder
that real institutions are often messier and more inventive than the models used to describe them.

By midsummer Clara had replaced the worn bearings, fitted a new electric lamp inside the old burner
housing and repaired the weights that drove the rotation. The council had asked her to keep the
original character of the light, so she timed the flashes with a stopwatch until they matched the
pattern recorded in an old almanac: two short flashes every fifteen seconds. On the night of the
first test, half the village gathered on the breakwater with blankets and thermos flasks. When the
beam finally swept across the water, there was a moment of silence, and then someone started to
clap.

Cooking in a small coastal village follows the seasons and the weather. In spring the boats bring in
mackerel, which is grilled over charcoal and served with a squeeze of lemon and a handful of chopped
parsley. Summer means tomatoes, courgettes and beans from the gardens behind the houses, stewed
slowly with garlic and olive oil until they are soft enough to spread on bread. In autumn people
gather mushrooms in the pine woods above the cliffs and preserve them in jars, while winter is the
time for thick soups of lentils, potatoes and smoked sausage that simmer for hours on the back of
the stove.

Science has its own slow rhythms. A biologist studying seabirds on the cliffs near the lighthouse
might spend ten years counting nests before a pattern becomes clear. Her records show that the
number of puffins has fallen sharply since the nineteen nineties, probably because the small fish
they feed on have moved north as the sea has grown warmer. Such conclusions are never drawn from a
single season. They depend on patient measurement, careful comparison with other colonies and an
honest account of the uncertainty in every estimate.

Travelers who come to the cape today usually arrive by the narrow road that winds along the coast
from the market town. The drive takes about forty minutes and passes through farmland, a small
forest of oak and chestnut, and finally a stretch of open moorland where sheep graze right up to the
edge of the asphalt. There is a car park near the old coastguard station, and from there a footpath
leads across the heath to the lighthouse. In good weather you can see the islands on the horizon,
and on clear nights the light is visible from the ferry that crosses to them twice a day.

Clara stayed in the village through the autumn, partly to watch the new light through its first
storms and partly because she had grown fond of the place. She taught an evening class on mechanics
at the school, where retired fishermen sat beside teenagers and argued about gear ratios. When she
finally left, the council gave her a small brass plaque engraved with the date of the first
lighting. She hung it above her desk in the city, and whenever a project went badly, she would look
at it and remember the silence on the breakwater before the applause.

Most of the work that keeps a community running is invisible until it stops. Water flows from the
tap, trains arrive more or less on time, and the lights come on when a switch is pressed. Behind
each of these ordinary events stand people who measure, repair and replace things that nobody else
notices. Perhaps that is why restored lighthouses attract so much affection: they make that quiet
labour visible, one flash at a time, to anyone who happens to be looking out at the sea.
"""
TEXT = re.sub(r"(?<!\n)\n(?!\n)", " ", _TEXT)  # lines of a paragraph joined with spaces

N_TOKENS = 1025  # 1,024 predicted positions
CHUNK = 256  # fed to one session in chunks of this many tokens
BOUNDS = {  # format -> (min top-1 agreement, max relative perplexity increase); see the table above
    "int8": (0.94, 0.01),
    "q8_0": (0.94, 0.01),
    "q4_0": (0.62, 0.30),
    "q4_1": (0.94, 0.05),
    "q6_k": (0.90, 0.02),
    "q4_k_m": (0.82, 0.07),
}


def _fetch():
    helpers.require_core()
    from pyxf import hub

    try:
        return hub.float32_model_path(), hub.default_gguf_path()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"SmolLM2-135M-Instruct could not be fetched: {e}")


def evaluate(model, ids):
    """(top-1 predictions [n-1], negative log-likelihood of ids[1:] [n-1]) from one session fed
    CHUNK tokens at a time."""
    session = model.session(len(ids))
    logits = np.concatenate([session.feed(ids[i : i + CHUNK]) for i in range(0, len(ids), CHUNK)])[:-1]
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return logits.argmax(axis=1), -log_probs[np.arange(len(ids) - 1), ids[1:]]


@pytest.fixture(scope="module")
def reference():
    import pyxf

    model_dir, gguf_path = _fetch()
    model = pyxf.load(model_dir)
    assert model.config["dtype"] == "float32" and not model.config.get("quantization")
    ids = model.tokenizer.encode(TEXT)
    assert len(ids) >= N_TOKENS, len(ids)
    ids = ids[:N_TOKENS]
    top1, nll = evaluate(model, ids)
    return {"dir": model_dir, "gguf": gguf_path, "ids": ids, "top1": top1, "ppl": float(np.exp(nll.mean()))}


def check(name, model, reference, min_agreement, max_ppl_increase):
    top1, nll = evaluate(model, reference["ids"])
    agreement = float((top1 == reference["top1"]).mean())
    ppl = float(np.exp(nll.mean()))
    increase = ppl / reference["ppl"] - 1
    print(
        f"\n{name}: top-1 agreement {agreement:.2%} over {len(top1)} positions, perplexity {ppl:.4f} "
        f"(float32 {reference['ppl']:.4f}, {increase:+.2%})"
    )
    if min_agreement is not None:
        assert agreement >= min_agreement, f"{name}: top-1 agreement {agreement:.2%} < {min_agreement:.0%}"
    assert increase <= max_ppl_increase, f"{name}: perplexity {ppl:.4f} is {increase:+.2%} from float32"


@pytest.mark.parametrize("fmt", sorted(BOUNDS))
def test_load_time_quantization_quality(reference, fmt):
    import pyxf

    model = pyxf.load(reference["dir"], quantize=fmt)
    formats = model.config["quantization"]["tensors"]
    tied_head = quant_mix.tensor_spec("embed.weight", (1, 576), model.config, fmt, tied_head=True)
    assert formats["embed.weight"] == tied_head  # the tied head, as llama.cpp stores it
    if fmt in quant_mix.MIXES:  # layer 0 is one of the mixes' q6_k layers (falling back on rows of 576)
        assert formats["layers.0.ffn.down.weight"] == "q6_k"
        assert formats["layers.0.attn.qkv.weight"] == [["q5_0", 768], ["q8_0", 192]]
    else:
        assert formats["layers.0.ffn.down.weight"] == fmt
    check(fmt, model, reference, *BOUNDS[fmt])


def test_llama_cpp_q4_k_m_file_quality(reference, tmp_path):
    # llama.cpp's own Q4_K_M file of these float weights (tests/kquant_files.py), run as stored
    import kquant_files
    import pyxf
    from pyxf.convert import convert

    path = kquant_files.smollm2_gguf("q4_k_m")
    model = pyxf.load(convert(path, tmp_path / "kept", progress=False))
    check("llama.cpp Q4_K_M file, kept", model, reference, *BOUNDS["q4_k_m"])


def test_gguf_blocks_kept_quality(reference, tmp_path):
    import pyxf
    from pyxf.convert import convert

    out = convert(reference["gguf"], tmp_path / "kept", progress=False)  # no flags: the GGUF's blocks kept
    model = pyxf.load(out)
    formats = model.config["quantization"]["tensors"]
    assert formats["embed.weight"] == "q8_0" and set(formats.values()) == {"q4_1", "q8_0"}
    check("gguf Q4_1 + Q8_0 embed/head, kept", model, reference, *BOUNDS["q8_0"])
