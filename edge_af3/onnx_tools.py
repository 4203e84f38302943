"""ONNX graph helpers shared by the exporter and the TensorRT engine; torch-free (onnx +
onnxruntime's float16 converter), so a Jetson with TensorRT but no torch can convert an fp32
bundle for its fp16 engine."""

from __future__ import annotations

from pathlib import Path


def resave(src: Path, dst: Path, external: bool) -> None:
    """Re-save `src` as `dst`, its weights inline or in a single `dst.data` file."""
    import onnx

    model = onnx.load(str(src))
    write(model, dst, external)


def write(model, dst: Path, external: bool) -> None:
    """Save `model` (its external data already loaded) as `dst`, its weights inline or in one
    `dst.data` file. A `dst.data` already there is removed first: onnx appends to it, so a stale one
    would be kept inside the new file (twice the bytes), and an inline save would leave it orphaned."""
    import onnx

    dst.with_name(dst.name + ".data").unlink(missing_ok=True)
    if external:
        onnx.save_model(
            model,
            str(dst),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=dst.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(dst))


def to_fp16(src: Path, dst: Path, external: bool) -> None:
    """fp16 weights and matmuls; LayerNorm, Softmax and the mask arithmetic stay in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Div", "Erf"],
    )
    del model
    write(half, dst, external)
