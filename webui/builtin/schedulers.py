"""The built-in samplers, under the names AUTOMATIC1111 users know."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from webui.api import hookimpl

LATENT_STUDIO_API = 1

KARRAS = {"use_karras_sigmas": True}
# A1111's "SGM Uniform" schedule (Forge's, ComfyUI's sgm_uniform): timesteps spaced from the last
# training step down, the last one included, as SDXL-Turbo, SD-Turbo and Lightning models expect
SGM_UNIFORM = {"timestep_spacing": "trailing"}


@hookimpl(tryfirst=True)
def register_schedulers(register: Any) -> None:
    register("Euler", EulerDiscreteScheduler)
    register("Euler a", EulerAncestralDiscreteScheduler, aliases=("euler_a", "euler ancestral"))
    register("Euler Karras", EulerDiscreteScheduler, **KARRAS)
    register("DPM++ 2M", DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2)
    register(
        "DPM++ 2M Karras", DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2, **KARRAS
    )
    register("DPM++ 2M SDE", DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=2)
    register(
        "DPM++ 2M SDE Karras",
        DPMSolverMultistepScheduler,
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        **KARRAS,
    )
    register("DPM++ 2S a", DPMSolverSinglestepScheduler, algorithm_type="dpmsolver++", solver_order=2)
    register("DPM++ SDE", DPMSolverSDEScheduler)
    register("DPM++ SDE Karras", DPMSolverSDEScheduler, **KARRAS)
    register("DPM2", KDPM2DiscreteScheduler)
    register("DPM2 Karras", KDPM2DiscreteScheduler, **KARRAS)
    register("DPM2 a", KDPM2AncestralDiscreteScheduler)
    register("DPM2 a Karras", KDPM2AncestralDiscreteScheduler, **KARRAS)
    register("DDIM", DDIMScheduler)
    register("PNDM", PNDMScheduler, aliases=("PLMS",))
    register("UniPC", UniPCMultistepScheduler)
    register("LMS", LMSDiscreteScheduler)
    register("LMS Karras", LMSDiscreteScheduler, **KARRAS)
    register("Heun", HeunDiscreteScheduler)
    register("DEIS", DEISMultistepScheduler)
    # few-step models: latent consistency (LCM models, LCM-LoRA), trajectory consistency (TCD-LoRA;
    # Eta is TCD's gamma, 0.3 in its paper), and the trailing schedule of Turbo/Lightning models
    register("LCM", LCMScheduler)
    register("TCD", TCDScheduler)
    for name, scheduler, options in (
        ("Euler", EulerDiscreteScheduler, {}),
        ("Euler a", EulerAncestralDiscreteScheduler, {}),
        ("DPM++ 2M", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        (
            "DPM++ 2M SDE",
            DPMSolverMultistepScheduler,
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        ),
        ("DPM++ SDE", DPMSolverSDEScheduler, {}),
        ("DDIM", DDIMScheduler, {}),
        ("UniPC", UniPCMultistepScheduler, {}),
        ("LCM", LCMScheduler, {}),
    ):
        register(f"{name} SGM Uniform", scheduler, **options, **SGM_UNIFORM)
