"""Test set-up: 4 host CPU devices (set before jax is imported) and shared tiny-model fixtures."""

import gc
import os

# tiny models: compiling dominates, so XLA:CPU generates code without LLVM's optimisation (a third less
# CPU for the parity files; IEEE arithmetic either way, no fast-math), also in the commands tests run
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4 "
                           + FAST_COMPILE_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("IVTLR_JAX_CACHE", "off")  # the commands run by tests leave no compilation cache behind

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from tests import hf_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory):
    """(folder, transformers model) of a tiny random Qwen2-VL saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny_qwen2vl")
    model = hf_tiny.build_qwen2vl(folder)
    return folder, model


@pytest.fixture(scope="session")
def qwen2vl_batch():
    """Two rows with images of different sizes, right-padded."""
    return hf_tiny.qwen2vl_image_batch(seed=0)


@pytest.fixture(scope="session")
def tiny_qwen25vl(tmp_path_factory):
    """(folder, transformers model) of a tiny random Qwen2.5-VL (windowed and full vision blocks)."""
    folder = tmp_path_factory.mktemp("tiny_qwen25vl")
    model = hf_tiny.build_qwen25vl(folder)
    return folder, model


@pytest.fixture(scope="session")
def tiny_qwen3vl(tmp_path_factory):
    """(folder, transformers model) of a tiny random Qwen3-VL (DeepStack into decoder layers 0 and 1)."""
    folder = tmp_path_factory.mktemp("tiny_qwen3vl")
    model = hf_tiny.build_qwen3vl(folder)
    return folder, model


@pytest.fixture(scope="session")
def tiny_chameleon(tmp_path_factory):
    """(folder, transformers model) of a tiny random Chameleon (VQ tokenizer included)."""
    folder = tmp_path_factory.mktemp("tiny_chameleon")
    model = hf_tiny.build_chameleon(folder)
    return folder, model


# transformers models with eager attention (the latent-loop oracle reads their attention matrices) and
# the Flax models loaded from the same folders
@pytest.fixture(scope="session")
def qwen(tiny_qwen2vl):
    from transformers import Qwen2VLForConditionalGeneration

    folder = tiny_qwen2vl[0]
    hf = Qwen2VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    from ivtlr_jax.io import from_pretrained

    return folder, hf, from_pretrained(folder)


@pytest.fixture(scope="session")
def qwen25(tiny_qwen25vl):
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder = tiny_qwen25vl[0]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    from ivtlr_jax.io import from_pretrained

    return folder, hf, from_pretrained(folder)


@pytest.fixture(scope="session")
def chameleon(tiny_chameleon):
    from transformers import ChameleonForConditionalGeneration

    folder = tiny_chameleon[0]
    hf = ChameleonForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    from ivtlr_jax.io import from_pretrained

    return folder, hf, from_pretrained(folder)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup` (make test) sends the tests of one `xdist_group` to one worker by suffixing their
    node ids with `@<group>`: pytest-xdist 3.8 sets `item._nodeid`, which pytest 9 no longer reads (the id
    lives in `item._id`), so without this every group is split and its module fixtures (test_train_loop's
    uninterrupted run, test_multihost's runs) are built once per worker."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId  # pytest 9
    except ImportError:  # earlier pytest reads item._nodeid, which pytest-xdist sets itself
        return

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and hasattr(item, "_id") and "@" not in item.nodeid.rpartition("]")[2]:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")


@pytest.fixture
def disk_calls(monkeypatch):
    """[("fsync", path) | ("rename", src, dst)] in the order they reach the OS (os.fsync, os.replace,
    os.rename recorded; the writes of ivtlr_jax/io/atomic.py and io/durable.py go through them)."""
    from pathlib import Path

    calls = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename
    path_of = lambda fd: Path(os.readlink(f"/proc/self/fd/{fd}"))
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", path_of(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("rename", Path(a), Path(b))), real_replace(a, b))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (calls.append(("rename", Path(a), Path(b))), real_rename(a, b))[1])
    return calls


@pytest.fixture
def image_decodes(monkeypatch):
    """[(mode, decoder name)], one entry for each compressed image file (PNG, JPEG, ...) that PIL decodes:
    PIL asks `Image._getdecoder` for the file format's decoder once per decoded frame, and opening a file
    to read its header asks for none ("raw" decoders, which unpack in-memory arrays such as
    `Image.fromarray`'s, are left out)."""
    from PIL import Image

    calls = []
    real = Image._getdecoder

    def counting(mode, name, *args, **kwargs):
        if name != "raw":
            calls.append((mode, name))
        return real(mode, name, *args, **kwargs)

    monkeypatch.setattr(Image, "_getdecoder", counting)
    return calls


@pytest.fixture(autouse=True, scope="session")
def commands_share_compilations(tmp_path_factory):
    """The commands the tests start (train.py, infer.py, the benches, each a new process) read and write one
    persistent compilation cache per test process, through JAX's own variables: a program another command
    already compiled (the same tiny model's step, again and again) is loaded, not compiled. The test process
    itself keeps none (JAX read its variables at import), and `IVTLR_JAX_CACHE=off` leaves the commands'
    own cache folder alone; pytest removes the folder with its other temporary ones."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"  # the programs worth loading
    yield


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Each test file's XLA programs are freed when it ends. XLA:CPU maps every compiled program's code into
    memory regions of its own (about 3.5 per program), and the programs of module-level jitted functions live
    as long as the process: an xdist worker that ran a few hundred test files' programs passed Linux's
    65530-mapping limit (vm.max_map_count), where LLVM's next code allocation segfaulted inside a compile."""
    yield
    jax.clear_caches()
    gc.collect()
