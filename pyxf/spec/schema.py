"""The vocabulary in which model architectures are declared (docs/DESIGN.md, "Model specs").

An architecture is a list of config fields, fixed tensors and stacks of layers. A tensor has a
name (inside a stack, the part after `{prefix}{i}.`), a shape made of dimension names that the architecture
derives from the normalized config (`dims`), and flags: required or optional (a bool or a function
of the config), whether it exists at all for a config (`when`), whether it may be stored quantized,
who reads it (the core, or Python for heads applied in numpy) and whether it is stored in
model.safetensors or made at load (sinusoidal tables, T5's bias by distance).

This module imports nothing, so that the declarations, the loader, the converter, the quantizer
and the tests can all read it without import cycles.
"""

# The default of a field that has none: config.json must hold it.
REQUIRED = "required"

# The `quantizable` value of token embeddings (truthy): quantized only when embeddings are.
EMBEDDING = "embedding"

# Who reads a tensor: the C++ core (it must bind exactly these), or pyxf's Python (heads in numpy,
# inputs of tables made at load).
CORE, PYTHON = "core", "python"


def _resolve(value, config):
    return value(config) if callable(value) else value


class Tensor:
    """One tensor: `name` (inside a stack, the suffix after the layer index), `shape` (dimension
    names or ints)."""

    __slots__ = ("name", "shape", "required", "when", "quantizable", "reader", "stored", "parts", "lookup",
                 "routed")

    def __init__(self, name, shape, *, required=True, when=None, quantizable=False, reader=CORE, stored=True,
                 parts=(), lookup=False, routed=False):
        self.name = name
        self.shape = tuple(shape)
        self.required = required  # bool, or config -> bool
        self.when = when  # None (always), or config -> bool: whether the config has this tensor
        self.quantizable = quantizable  # True (a linear weight) or EMBEDDING: may be stored in blocks
        self.reader = reader  # CORE or PYTHON
        self.stored = stored  # False: made at load from the config and other tensors, not in the file
        self.parts = tuple(parts)  # fused matrices: ((part, rows dimension), ...) in row order (q, k, v)
        self.lookup = lookup  # a table whose rows are looked up (embeddings): a step reads one row
        # experts stacked along the rows: a token reads num_experts_per_tok of the num_experts
        self.routed = routed

    def exists(self, config):
        return self.when is None or bool(self.when(config))

    def resolve(self, config, dims):
        """(shape as ints, required, parts as ((part, rows), ...)) for this config."""
        shape = tuple(dims[d] if isinstance(d, str) else d for d in self.shape)
        parts = tuple((part, dims[rows]) for part, rows in self.parts)
        return shape, bool(_resolve(self.required, config)), parts

    def __repr__(self):
        return f"Tensor({self.name!r}, {self.shape})"


def linear(name, rows, cols, *, required=True, when=None, quantizable=True, reader=CORE, parts=()):
    """A linear layer: `name.weight` [rows, cols] and an optional `name.bias` [rows]; `parts`: the
    matrices a fused weight stacks, ((part, rows dimension), ...)."""
    return (
        Tensor(f"{name}.weight", (rows, cols), required=required, when=when, quantizable=quantizable, reader=reader,
               parts=parts),
        Tensor(f"{name}.bias", (rows,), required=False, when=when, reader=reader),
    )


def norm(name, *, required=True, when=None):
    """A norm over the hidden size: weight, and a bias that LayerNorm requires and RMSNorm lacks;
    no bias at all when the config says its norms have none (norm_bias false: ModernBERT)."""

    def bias_required(config):
        return bool(_resolve(required, config)) and config["norm"] == "layernorm"

    def bias_exists(config):
        return (when is None or bool(when(config))) and config.get("norm_bias", True) is not False

    return (
        Tensor(f"{name}.weight", ("H",), required=required, when=when),
        Tensor(f"{name}.bias", ("H",), required=bias_required, when=bias_exists),
    )


class Field:
    """One config.json key: its kind, default (REQUIRED: none, the key must be present; a field
    with a default may also be null) and allowed values."""

    __slots__ = ("name", "kind", "default", "choices", "doc")

    # kinds: "size" (a positive int the core holds in 32 bits), "count" (a non-negative int),
    # "bool", "choice", "number", "positive" (a positive number), "text", "object", "ids"
    def __init__(self, name, kind, default=REQUIRED, choices=None, doc=""):
        self.name = name
        self.kind = kind
        self.default = default
        self.choices = tuple(choices) if choices is not None else None
        self.doc = doc

    def __repr__(self):
        return f"Field({self.name!r}, {self.kind!r})"


class Stack:
    """Layers that repeat one pattern, `count_field` of them: tensor `suffix` of layer i is named
    `{prefix}{i}.{suffix}`."""

    __slots__ = ("prefix", "count_field", "tensors")

    def __init__(self, prefix, count_field, tensors):
        self.prefix = prefix
        self.count_field = count_field
        self.tensors = tuple(tensors)


class Architecture:
    """A model architecture: its config fields, dimensions, fixed tensors and stacks of layers."""

    def __init__(self, name, *, families, fields, dims, tensors, stacks, check=None, doc=""):
        self.name = name
        self.families = tuple(families)  # config.json "family" values with this architecture
        self.fields = tuple(fields)
        self.dims = dims  # config -> {dimension name: int}
        self.tensors = tuple(tensors)
        self.stacks = tuple(stacks)
        self.check = check  # (config, fail) -> None: rules that span fields
        self.doc = doc

    def layout(self, config, stored=True):
        """The TensorLayout of a config: the tensors model.safetensors holds (stored=True), or the
        tensors the core binds (stored=None: every core tensor, made at load or not)."""
        dims = self.dims(config)

        def entries(tensors, prefix=""):
            out = {}
            for t in tensors:
                if not t.exists(config) or (stored and not t.stored) or (stored is None and t.reader != CORE):
                    continue
                out[prefix + t.name] = TensorEntry(*t.resolve(config, dims), t)
            return out

        stacks = [(s.prefix, config[s.count_field], entries(s.tensors)) for s in self.stacks]
        return TensorLayout(entries(self.tensors), stacks)


class TensorEntry(tuple):
    """(shape, required) of one tensor of a config, with its declaration as `.tensor` and the row
    counts of a fused matrix's parts as `.parts` (((part, rows), ...), empty for others)."""

    def __new__(cls, shape, required, parts, tensor):
        entry = super().__new__(cls, (shape, required))
        entry.parts = parts
        entry.tensor = tensor
        return entry


class TensorLayout:
    """The tensors a config describes: fixed ones, and stacks of layers that repeat one pattern.

    Kept in this form, not enumerated, so that the size of a config's claims can be checked against
    the weight file before any work proportional to them: a 1 KB config.json with num_layers 2**31
    must not make pyxf list 2**31 layers."""

    def __init__(self, fixed, stacks):
        self.fixed = fixed  # {name: TensorEntry}
        self.stacks = stacks  # [(prefix, count, {suffix: TensorEntry})]: names "{prefix}{i}.{suffix}"

    def required_count(self):
        return sum(required for _, required in self.fixed.values()) + sum(
            count * sum(required for _, required in layer.values()) for _, count, layer in self.stacks
        )

    def lookup(self, name):
        """The TensorEntry (shape, required) of one tensor name, or None when the config has none."""
        if name in self.fixed:
            return self.fixed[name]
        for prefix, count, layer in self.stacks:
            if name.startswith(prefix):
                index, _, suffix = name[len(prefix):].partition(".")
                if index.isdigit() and index == str(int(index)) and int(index) < count and suffix in layer:
                    return layer[suffix]
        return None

    def enumerate(self, max_tensors):
        """{name: TensorEntry} of every tensor; ValueError, before listing them, when the config
        requires far more tensors than the `max_tensors` the weight file holds (up to twice as many
        are listed, so that a file missing a few gets a message naming them)."""
        required = self.required_count()
        if required > 2 * max_tensors + 64:
            raise ValueError(
                f"the config describes {' and '.join(f'{count} layers {prefix}N' for prefix, count, _ in self.stacks)}, "
                f"at least {required} tensors, but model.safetensors holds {max_tensors}"
            )
        tensors = dict(self.fixed)
        for prefix, count, layer in self.stacks:
            for i in range(count):
                tensors.update({f"{prefix}{i}.{suffix}": entry for suffix, entry in layer.items()})
        return tensors
