// θ ← backup over every tensor of a parameter group that has a gradient this
// step (those the in-place perturbation visited), bit for bit, in one launch.
// Elements move as unsigned words of their size, never through a float, so
// NaN payloads and signed zeros come back unchanged: 8 B/param for f32.
#include "multi_tensor.cuh"

#define RESTORE_THREADS 256

template <typename W>
__device__ void restore(const MtTensor* tensors, const MtChunk* chunks, const uint32_t* n_chunks) {
    const uint32_t n = *n_chunks;
    for (uint32_t c = blockIdx.x; c < n; c += gridDim.x) {
        const MtChunk ch = chunks[c];
        const MtTensor& t = tensors[ch.tensor];
        mt_copy_chunk<W>(reinterpret_cast<const W*>(t.ptr[MT_SLOT_BACKUP]),
                         reinterpret_cast<W*>(t.ptr[MT_SLOT_PARAM]), mt_span(t, ch));
    }
}

// By element size: b16 for f16/bf16, b32 for f32.
extern "C" __global__ void __launch_bounds__(RESTORE_THREADS)
    restore_b16(const MtTensor* tensors, const MtChunk* chunks, const uint32_t* n_chunks) {
    restore<uint16_t>(tensors, chunks, n_chunks);
}
extern "C" __global__ void __launch_bounds__(RESTORE_THREADS)
    restore_b32(const MtTensor* tensors, const MtChunk* chunks, const uint32_t* n_chunks) {
    restore<uint32_t>(tensors, chunks, n_chunks);
}
