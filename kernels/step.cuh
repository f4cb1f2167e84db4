// The state a TRAM step keeps in device memory, so that a replayed CUDA graph
// sees it too (mirrors `StepState` and `StepStatus` in src/cuda/step.rs and
// src/step.rs). The first step's gate (step_first_begin in step.cu) and the
// second step's (optimizer_begin in optimizer.cu) read and write it; the
// update kernel follows the decision the second one leaves in `skip` and
// `restore`.
#pragma once
#include "common.cuh"

struct StepState {
    uint32_t phase;      // TRAM_PHASE_*: whether θ is perturbed now
    uint32_t status;     // TRAM_STEP_* bits of the current (or last) iteration
    uint32_t found_inf;  // raised by optimizer_check, consumed by optimizer_begin
    uint32_t skip;       // optimizer_begin's decision: 1 = restore only, no update
    uint32_t restore;    // 1: θ comes from the backup slot (perturbed in place)
    uint32_t pad[3];
};

#define TRAM_PHASE_IDLE 0u
#define TRAM_PHASE_PERTURBED 1u

// Mirrors `StepStatus` in src/step.rs.
#define TRAM_STEP_SKIPPED 1u           // the update was skipped (found inf)
#define TRAM_STEP_FOUND_INF_FIRST 2u   // the first step's norm was not finite
#define TRAM_STEP_FOUND_INF_SECOND 4u  // a second-step gradient was inf/NaN or >= 2^64
#define TRAM_STEP_PHASE_ERROR 8u       // steps ran out of order (a replayed graph)
#define TRAM_STEP_UNPERTURBED 16u      // the update ran at θ (no first step before it)

// |s·g| at or above this is treated as an overflow: its square, AdamW's
// second moment, no longer fits f32.
#define TRAM_GRAD_LIMIT 18446744073709551616.0  // 2^64
