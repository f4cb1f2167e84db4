// The first step's gate: one thread, before the norm and the perturbation,
// keeps the phase of a TRAM step in device memory so that graph replays are
// checked too. Idle: the iteration starts (status cleared, phase perturbed)
// and the norm and perturbation get the group's chunk counts. Already
// perturbed (a first step replayed twice): PHASE_ERROR, and the counts the
// norm and perturbation read are zeroed, so θ and the backup of the first
// perturbation stay as they are and the second step still restores θ.
#include "step.cuh"

// counts: [active, all] chunk counts the norm and perturbation read, then the
// group's own [active, all] (src/cuda/group.rs).
extern "C" __global__ void step_first_begin(StepState* s, uint32_t* counts) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    if (s->phase == TRAM_PHASE_PERTURBED) {
        s->status |= TRAM_STEP_PHASE_ERROR;
        counts[0] = 0u;
        counts[1] = 0u;
    } else {
        s->phase = TRAM_PHASE_PERTURBED;
        s->status = 0u;
        counts[0] = counts[2];
        counts[1] = counts[3];
    }
}
