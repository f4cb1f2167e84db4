// A kernel whose parameter has another size on the host than on the device:
// the driver must refuse the image that declares it.
#ifdef __CUDA_ARCH__
typedef long long emu_count_t;
#else
typedef int emu_count_t;
#endif

extern "C" __global__ void emutest_mismatch(float* out, emu_count_t n) {
    if ((emu_count_t)threadIdx.x < n) out[threadIdx.x] = 1.0f;
}
