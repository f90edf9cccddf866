"""`pipeline("secure-text-generation")`: text generation with every forward pass over CKKS."""

from transformers import AutoModelForCausalLM, TextGenerationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

TASK = "secure-text-generation"


class SecureTextGenerationPipeline(TextGenerationPipeline):
    """`TextGenerationPipeline` whose `generate` runs over CKKS (one prompt at a time).

    Extra call arguments: `session` (a `SecureSession` to reuse; default: new keys per call,
    server in-process) and `server="process"` to run the server in a separate process. Each
    output record carries `latency_report`: prefill and per-token times and the per-operation
    breakdown.

        pipe = pipeline("secure-text-generation", model="runs/tiny")
        pipe("ROMEO.", max_new_tokens=20, do_sample=False)[0]["generated_text"]
    """

    def _sanitize_parameters(self, session=None, server=None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if session is not None:
            forward["session"] = session
        if server is not None:
            forward["server"] = server
        return preprocess, forward, postprocess

    def _forward(self, model_inputs, session=None, server="in-process", **generate_kwargs):
        if model_inputs["input_ids"].shape[1] == 0:
            raise ValueError("secure generation needs a non-empty prompt")
        # Absolute import: this file is shipped as-is next to a pushed model (its `custom_pipelines`)
        from hf_polyattn.generation import secure_session_class

        own = session is None
        session = session or secure_session_class()(self.model, server=server, progress=True)
        try:
            outputs = super()._forward(model_inputs, session=session, **generate_kwargs)
            outputs["latency_report"] = session.report()
        finally:
            if own:
                session.close()
        return outputs

    def postprocess(self, model_outputs, *args, **kwargs):
        report = model_outputs.pop("latency_report")
        records = super().postprocess(model_outputs, *args, **kwargs)
        return [{**record, "latency_report": report} for record in records]


def register() -> None:
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=SecureTextGenerationPipeline, pt_model=AutoModelForCausalLM, type="text")
