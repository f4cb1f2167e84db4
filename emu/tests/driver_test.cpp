// The emulated device's own tests, through the driver API as cudarc calls it:
// each refusal fires with the error code the real driver returns, each capture
// rule of emu/README.md is enforced, and each in-kernel error stops the
// process naming the kernel, block and thread. Kernels: emu/tests/kernels/.
//
// Run by scripts/emu-test.sh (TRAM_EMU_KERNEL_LIBS names the test kernels).
// Tests that need another schedule or an expected crash re-run this binary
// with `--child NAME` and other settings, and check how it ended.
#include <cuda.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifndef TEST_PTX_DIR
#error "TEST_PTX_DIR must name the folder of the test kernels' PTX"
#endif

namespace {

int g_failures = 0;
const char* g_test = "";

void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL %s: ", g_test);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    g_failures++;
}

const char* name_of(CUresult r) {
    const char* s = nullptr;
    cuGetErrorName(r, &s);
    return s ? s : "(unknown)";
}

#define EXPECT(cond)                                            \
    do {                                                        \
        if (!(cond)) fail("%s:%d: %s", __FILE__, __LINE__, #cond); \
    } while (0)
#define EXPECT_CU(call, want)                                                                   \
    do {                                                                                        \
        CUresult got_ = (call);                                                                 \
        if (got_ != (want))                                                                     \
            fail("%s:%d: %s returned %s, expected %s", __FILE__, __LINE__, #call, name_of(got_), \
                 name_of(want));                                                                \
    } while (0)
#define OK(call) EXPECT_CU(call, CUDA_SUCCESS)

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

CUcontext g_ctx;
CUmodule g_mod;

CUfunction fn(const char* name) {
    CUfunction f = nullptr;
    OK(cuModuleGetFunction(&f, g_mod, name));
    return f;
}

CUdeviceptr alloc(size_t bytes, CUstream s = nullptr) {
    CUdeviceptr p = 0;
    OK(cuMemAllocAsync(&p, bytes, s));
    return p;
}

std::vector<float> read(CUdeviceptr p, size_t n) {
    std::vector<float> v(n);
    OK(cuMemcpyDtoHAsync(v.data(), p, n * 4, nullptr));
    return v;
}

void write(CUdeviceptr p, const std::vector<float>& v) { OK(cuMemcpyHtoDAsync(p, v.data(), v.size() * 4, nullptr)); }

CUresult launch(CUfunction f, unsigned grid, unsigned block, std::vector<void*> args, CUstream s = nullptr,
                unsigned smem = 0) {
    return cuLaunchKernel(f, grid, 1, 1, block, 1, 1, smem, s, args.data(), nullptr);
}

CUstream new_stream() {
    CUstream s;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    return s;
}

// --- the device and its memory ------------------------------------------------

void device_and_memory() {
    int v = 0;
    OK(cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 0));
    EXPECT(v == 132);
    OK(cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 0));
    EXPECT(v == 9);
    OK(cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, 0));
    EXPECT(v == 1);
    size_t free0, total;
    OK(cuMemGetInfo(&free0, &total));
    const char* mib = getenv("TRAM_EMU_MEMORY_MIB");
    EXPECT(total == (size_t)(mib ? atoll(mib) : 4096) << 20);
    // More than the device has: refused, nothing allocated.
    CUdeviceptr p = 0;
    EXPECT_CU(cuMemAllocAsync(&p, free0 + 1, nullptr), CUDA_ERROR_OUT_OF_MEMORY);
    EXPECT_CU(cuMemAlloc(&p, free0 + 1), CUDA_ERROR_OUT_OF_MEMORY);
    // Fresh memory is poison (NaN as a float), exactly as large as asked.
    p = alloc(40);
    size_t free1;
    OK(cuMemGetInfo(&free1, &total));
    EXPECT(free0 - free1 == 40);
    for (float x : read(p, 10)) EXPECT(std::isnan(x));
    // Copies outside an allocation are refused.
    std::vector<float> h(11, 1.0f);
    EXPECT_CU(cuMemcpyHtoDAsync(p, h.data(), 44, nullptr), CUDA_ERROR_INVALID_VALUE);
    EXPECT_CU(cuMemcpyDtoHAsync(h.data(), p + 4, 40, nullptr), CUDA_ERROR_INVALID_VALUE);
    OK(cuMemFreeAsync(p, nullptr));
    OK(cuStreamSynchronize(nullptr));
    OK(cuMemGetInfo(&free1, &total));
    EXPECT(free1 == free0);
    EXPECT_CU(cuMemFreeAsync(p, nullptr), CUDA_ERROR_INVALID_VALUE);
}

// The freed buffer is poisoned at the free's place in its stream: a kernel
// enqueued after it reads garbage (the sanitizer build reports the use).
void child_use_after_free() {
    CUstream s = new_stream();
    CUdeviceptr x = alloc(256 * 4, s), part = alloc(4, s), counter = alloc(4, s), out = alloc(4, s);
    OK(cuMemsetD8Async(counter, 0, 4, s));
    std::vector<float> ones(256, 1.0f);
    OK(cuMemcpyHtoDAsync(x, ones.data(), 1024, s));
    int n = 256;
    OK(launch(fn("emutest_sum"), 1, 256, {&x, &n, &part, &counter, &out}, s));
    std::vector<float> got(1);
    OK(cuMemcpyDtoHAsync(got.data(), out, 4, s));
    EXPECT(got[0] == 256.0f);
    OK(cuMemFreeAsync(x, s));
    OK(launch(fn("emutest_sum"), 1, 256, {&x, &n, &part, &counter, &out}, s));
    OK(cuMemcpyDtoHAsync(got.data(), out, 4, s));
    printf("after-free %g\n", got[0]);
}

// --- modules ---------------------------------------------------------------------

void module_refusals() {
    CUmodule m;
    // The host build and the PTX disagree on a parameter's size.
    std::string mismatch = read_file(TEST_PTX_DIR "/emutest_mismatch.ptx");
    EXPECT(!mismatch.empty());
    EXPECT_CU(cuModuleLoadData(&m, mismatch.c_str()), CUDA_ERROR_INVALID_IMAGE);
    // A kernel the emulator has no host build of.
    std::string ptx = read_file(TEST_PTX_DIR "/emutest.ptx");
    std::string renamed = ptx;
    size_t at = renamed.find(".entry emutest_add");
    EXPECT(at != std::string::npos);
    renamed.replace(at, 18, ".entry emutest_zzz");
    EXPECT_CU(cuModuleLoadData(&m, renamed.c_str()), CUDA_ERROR_INVALID_IMAGE);
    // Neither fatbin nor PTX.
    EXPECT_CU(cuModuleLoadData(&m, "not an image"), CUDA_ERROR_INVALID_IMAGE);
    // PTX for a newer architecture only: nothing an sm_90 device can run.
    std::string newer = ptx;
    at = newer.find(".target sm_80");
    EXPECT(at != std::string::npos);
    newer.replace(at, 13, ".target sm_100");
    EXPECT_CU(cuModuleLoadData(&m, newer.c_str()), CUDA_ERROR_NO_BINARY_FOR_GPU);
    // A fatbin whose PTX is compressed: no signatures to check against.
    std::vector<unsigned char> fat(16 + 80 + 32, 0);
    const uint32_t magic = 0xBA55ED50u;
    const uint16_t version = 1, header = 16, kind = 1, one = 0x0101;
    const uint64_t body = 80 + 32, payload = 32, flags = 0x8011;
    const uint32_t entry_header = 80, arch = 80;
    memcpy(&fat[0], &magic, 4);
    memcpy(&fat[4], &version, 2);
    memcpy(&fat[6], &header, 2);
    memcpy(&fat[8], &body, 8);
    memcpy(&fat[16], &kind, 2);
    memcpy(&fat[18], &one, 2);
    memcpy(&fat[20], &entry_header, 4);
    memcpy(&fat[24], &payload, 8);
    memcpy(&fat[16 + 0x1c], &arch, 4);
    memcpy(&fat[16 + 0x28], &flags, 8);
    EXPECT_CU(cuModuleLoadData(&m, fat.data()), CUDA_ERROR_INVALID_IMAGE);
    EXPECT_CU(cuModuleGetFunction(nullptr, g_mod, "emutest_add"), CUDA_ERROR_INVALID_VALUE);
    CUfunction f;
    EXPECT_CU(cuModuleGetFunction(&f, g_mod, "no_such_kernel"), CUDA_ERROR_NOT_FOUND);
}

// --- launches ---------------------------------------------------------------------

void launch_refusals() {
    CUdeviceptr out = alloc(1024 * 4 * 4);
    // Over the kernel's .maxntid (launch bounds of 128).
    CUfunction bounded = fn("emutest_bounded");
    EXPECT_CU(launch(bounded, 1, 256, {&out}), CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES);
    OK(launch(bounded, 2, 128, {&out}));
    // Over the device's limits.
    EXPECT_CU(launch(bounded, 1, 1025, {&out}), CUDA_ERROR_INVALID_VALUE);
    EXPECT_CU(launch(bounded, 0, 64, {&out}), CUDA_ERROR_INVALID_VALUE);
    void* args[] = {&out};
    EXPECT_CU(cuLaunchKernel(bounded, 1, 65536, 1, 32, 1, 1, 0, nullptr, args, nullptr), CUDA_ERROR_INVALID_VALUE);
    EXPECT_CU(cuLaunchKernel(bounded, 1, 1, 1, 8, 8, 65, 0, nullptr, args, nullptr), CUDA_ERROR_INVALID_VALUE);
    // 40 KiB static shared memory: 16 KiB more dynamic is over 48 KiB.
    CUfunction big = fn("emutest_big_smem");
    int smem = 0;
    OK(cuFuncGetAttribute(&smem, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, big));
    EXPECT(smem == 40960);
    EXPECT_CU(launch(big, 1, 256, {&out}, nullptr, 16 << 10), CUDA_ERROR_INVALID_VALUE);
    OK(launch(big, 1, 256, {&out}, nullptr, 0));
    // Registers × threads over the 65,536 a block has.
    CUfunction regs = fn("emutest_many_regs");
    int nregs = 0;
    OK(cuFuncGetAttribute(&nregs, CU_FUNC_ATTRIBUTE_NUM_REGS, regs));
    EXPECT(nregs > 64);
    CUdeviceptr in = alloc(1024 * 4);
    OK(cuMemsetD8Async(in, 0, 1024 * 4, nullptr));
    int n = 1024;
    EXPECT_CU(launch(regs, 1, 1024, {&in, &out, &n}), CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES);
    OK(launch(regs, 1, 256, {&in, &out, &n}));
    int per_sm = 0;
    OK(cuOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, regs, 1024, 0));
    EXPECT(per_sm == 0);
    OK(cuOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, bounded, 128, 0));
    EXPECT(per_sm == 16);  // 2048 threads per SM
    // Missing parameters.
    EXPECT_CU(cuLaunchKernel(bounded, 1, 1, 1, 32, 1, 1, 0, nullptr, nullptr, nullptr), CUDA_ERROR_INVALID_VALUE);
    OK(cuStreamSynchronize(nullptr));
}

// Parameters are read by the kernel's own C++ types: a value lands where the
// kernel looks for it.
void kernels_compute() {
    const int n = 1000;
    CUdeviceptr x = alloc(n * 4);
    write(x, std::vector<float>(n, 2.0f));
    float v = 0.5f;
    int nn = n;
    OK(launch(fn("emutest_add"), (n + 255) / 256, 256, {&x, &v, &nn}));
    for (float y : read(x, n)) EXPECT(y == 2.5f);
    // A block sum: the right total on any schedule.
    CUdeviceptr part = alloc(64 * 4), counter = alloc(4), out = alloc(4);
    OK(cuMemsetD8Async(counter, 0, 4, nullptr));
    OK(launch(fn("emutest_sum"), 8, 128, {&x, &nn, &part, &counter, &out}));
    EXPECT(read(out, 1)[0] == 2500.0f);
}

// --- capture ---------------------------------------------------------------------

CUgraphExec instantiate(CUgraph g) {
    CUgraphExec e = nullptr;
    OK(cuGraphInstantiateWithFlags(&e, g, 0));
    return e;
}

// Launches are recorded with their parameters as they were at capture time;
// replays run them again.
void capture_records_and_replays() {
    CUstream s = new_stream();
    CUdeviceptr x = alloc(64 * 4, s);
    write(x, std::vector<float>(64, 0.0f));
    OK(cuStreamSynchronize(nullptr));
    float v = 1.0f;
    int n = 64;
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    CUstreamCaptureStatus st;
    OK(cuStreamIsCapturing(s, &st));
    EXPECT(st == CU_STREAM_CAPTURE_STATUS_ACTIVE);
    OK(launch(fn("emutest_add"), 1, 64, {&x, &v, &n}, s));
    v = 100.0f;  // too late: the parameter was copied
    OK(launch(fn("emutest_add"), 1, 64, {&x, &v, &n}, s));
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    EXPECT(g != nullptr);
    OK(cuStreamSynchronize(s));
    EXPECT(read(x, 1)[0] == 0.0f);  // capturing ran nothing
    CUgraphExec e = instantiate(g);
    OK(cuGraphLaunch(e, s));
    OK(cuGraphLaunch(e, s));
    OK(cuStreamSynchronize(s));
    EXPECT(read(x, 1)[0] == 202.0f);
    OK(cuGraphExecDestroy(e));
    OK(cuGraphDestroy(g));
    OK(cuStreamDestroy(s));
}

// C1: the legacy stream cannot be captured.
void capture_rule_legacy_stream() {
    EXPECT_CU(cuStreamBeginCapture(nullptr, CU_STREAM_CAPTURE_MODE_GLOBAL), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    CUstream s = new_stream();
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    EXPECT_CU(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL), CUDA_ERROR_ILLEGAL_STATE);
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    OK(cuGraphDestroy(g));
    EXPECT_CU(cuStreamEndCapture(s, &g), CUDA_ERROR_ILLEGAL_STATE);
    OK(cuStreamDestroy(s));
}

// Ends a capture that must have been invalidated.
void expect_invalidated(CUstream s) {
    CUstreamCaptureStatus st;
    OK(cuStreamIsCapturing(s, &st));
    EXPECT(st == CU_STREAM_CAPTURE_STATUS_INVALIDATED);
    CUgraph g = reinterpret_cast<CUgraph>(1);
    EXPECT_CU(cuStreamEndCapture(s, &g), CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    EXPECT(g == nullptr);
}

// C2: a capturing stream cannot be synchronized or queried; either
// invalidates the capture.
void capture_rule_stream_sync() {
    CUstream s = new_stream();
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    EXPECT_CU(cuStreamSynchronize(s), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    float v = 1;
    int n = 0;
    CUdeviceptr x = 0;
    EXPECT_CU(launch(fn("emutest_add"), 1, 32, {&x, &v, &n}, s), CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    expect_invalidated(s);
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    EXPECT_CU(cuStreamQuery(s), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    expect_invalidated(s);
    OK(cuStreamDestroy(s));
}

// C3: synchronizing the context, from any thread, while a stream captures.
void capture_rule_context_sync() {
    CUstream s = new_stream();
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    std::thread other([] {
        OK(cuCtxSetCurrent(g_ctx));
        EXPECT_CU(cuCtxSynchronize(), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    });
    other.join();
    expect_invalidated(s);
    OK(cuStreamDestroy(s));
}

// C4: with a blocking stream capturing, the legacy stream cannot be used.
void capture_rule_legacy_implicit() {
    CUstream blocking;
    OK(cuStreamCreate(&blocking, CU_STREAM_DEFAULT));
    OK(cuStreamBeginCapture(blocking, CU_STREAM_CAPTURE_MODE_RELAXED));
    CUdeviceptr x = alloc(16, new_stream());
    EXPECT_CU(cuMemsetD8Async(x, 0, 16, nullptr), CUDA_ERROR_STREAM_CAPTURE_IMPLICIT);
    expect_invalidated(blocking);
    // A non-blocking stream's capture leaves the legacy stream usable.
    CUstream s = new_stream();
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    OK(cuMemsetD8Async(x, 0, 16, nullptr));
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    OK(cuGraphDestroy(g));
    OK(cuStreamDestroy(s));
    OK(cuStreamDestroy(blocking));
}

// C5: a capturing stream may not wait on an event recorded outside the capture
// (unless the wait is marked external).
void capture_rule_isolation() {
    CUstream s = new_stream(), t = new_stream();
    CUevent e;
    OK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
    OK(cuEventRecord(e, t));
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuStreamWaitEvent(s, e, CU_EVENT_WAIT_EXTERNAL));
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    OK(cuGraphDestroy(g));
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    EXPECT_CU(cuStreamWaitEvent(s, e, 0), CUDA_ERROR_STREAM_CAPTURE_ISOLATION);
    expect_invalidated(s);
    OK(cuEventDestroy(e));
    OK(cuStreamDestroy(s));
    OK(cuStreamDestroy(t));
}

// C6: potentially unsafe calls (synchronous allocation, copies) are refused on
// the capturing thread unless it captures in relaxed mode, and on every thread
// while a global-mode capture runs.
void capture_rule_unsafe_calls() {
    CUstream s = new_stream();
    CUdeviceptr p = 0;
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    std::thread other([&] {
        OK(cuCtxSetCurrent(g_ctx));
        EXPECT_CU(cuMemAlloc(&p, 64), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    });
    other.join();
    expect_invalidated(s);
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
    std::thread other2([&] {
        OK(cuCtxSetCurrent(g_ctx));
        OK(cuMemAlloc(&p, 64));  // another thread's thread-local capture does not matter
        OK(cuMemFree(p));
    });
    other2.join();
    EXPECT_CU(cuMemAlloc(&p, 64), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    expect_invalidated(s);
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    OK(cuMemAlloc(&p, 64));
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    OK(cuGraphDestroy(g));
    OK(cuMemFree(p));
    OK(cuStreamDestroy(s));
}

// C7: an event last recorded in a capture cannot be queried or waited for.
void capture_rule_captured_event() {
    CUstream s = new_stream(), t = new_stream();
    CUevent e;
    OK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuEventRecord(e, s));
    EXPECT_CU(cuEventQuery(e), CUDA_ERROR_CAPTURED_EVENT);
    expect_invalidated(s);
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuEventRecord(e, s));
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    OK(cuGraphDestroy(g));
    // After the capture ended, still captured until recorded again.
    EXPECT_CU(cuEventSynchronize(e), CUDA_ERROR_CAPTURED_EVENT);
    EXPECT_CU(cuStreamWaitEvent(t, e, 0), CUDA_ERROR_CAPTURED_EVENT);
    OK(cuEventRecord(e, t));
    OK(cuEventSynchronize(e));
    OK(cuEventDestroy(e));
    OK(cuStreamDestroy(s));
    OK(cuStreamDestroy(t));
}

// C8: fork and join through captured events; unjoined work, ending on a
// joined stream, and merging two captures are refused.
void capture_rule_fork_join() {
    CUstream s = new_stream(), t = new_stream(), u = new_stream();
    CUevent fork, join;
    OK(cuEventCreate(&fork, CU_EVENT_DISABLE_TIMING));
    OK(cuEventCreate(&join, CU_EVENT_DISABLE_TIMING));
    CUdeviceptr x = alloc(64 * 4, s);
    write(x, std::vector<float>(64, 0.0f));
    OK(cuStreamSynchronize(nullptr));
    float v = 1;
    int n = 64;
    // Joined back: a graph with both streams' work.
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuEventRecord(fork, s));
    OK(cuStreamWaitEvent(t, fork, 0));  // t joins the capture
    CUstreamCaptureStatus st;
    OK(cuStreamIsCapturing(t, &st));
    EXPECT(st == CU_STREAM_CAPTURE_STATUS_ACTIVE);
    OK(launch(fn("emutest_add"), 1, 64, {&x, &v, &n}, t));
    OK(cuEventRecord(join, t));
    OK(cuStreamWaitEvent(s, join, 0));
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    OK(cuStreamIsCapturing(t, &st));
    EXPECT(st == CU_STREAM_CAPTURE_STATUS_NONE);
    CUgraphExec e = instantiate(g);
    OK(cuGraphLaunch(e, s));
    OK(cuStreamSynchronize(s));
    EXPECT(read(x, 1)[0] == 1.0f);
    OK(cuGraphExecDestroy(e));
    OK(cuGraphDestroy(g));
    // Not joined back.
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuEventRecord(fork, s));
    OK(cuStreamWaitEvent(t, fork, 0));
    OK(launch(fn("emutest_add"), 1, 64, {&x, &v, &n}, t));
    EXPECT_CU(cuStreamEndCapture(t, &g), CUDA_ERROR_STREAM_CAPTURE_UNMATCHED);
    g = reinterpret_cast<CUgraph>(1);
    EXPECT_CU(cuStreamEndCapture(s, &g), CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuEventRecord(fork, s));
    OK(cuStreamWaitEvent(t, fork, 0));
    OK(launch(fn("emutest_add"), 1, 64, {&x, &v, &n}, t));
    EXPECT_CU(cuStreamEndCapture(s, &g), CUDA_ERROR_STREAM_CAPTURE_UNJOINED);
    EXPECT(g == nullptr);
    // Two captures cannot be merged.
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuStreamBeginCapture(u, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuEventRecord(fork, s));
    EXPECT_CU(cuStreamWaitEvent(u, fork, 0), CUDA_ERROR_STREAM_CAPTURE_MERGE);
    expect_invalidated(s);
    expect_invalidated(u);
    OK(cuEventDestroy(fork));
    OK(cuEventDestroy(join));
    OK(cuStreamDestroy(s));
    OK(cuStreamDestroy(t));
    OK(cuStreamDestroy(u));
}

// C10: stream-ordered allocation and free are captured; a capture may free
// only what its own allocation nodes made.
void capture_rule_allocations() {
    CUstream s = new_stream();
    CUdeviceptr outside = alloc(64, s), inside = 0;
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuMemAllocAsync(&inside, 256, s));
    float v = 3;
    int n = 64;
    OK(launch(fn("emutest_add"), 1, 64, {&inside, &v, &n}, s));
    OK(cuMemFreeAsync(inside, s));
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    CUgraphExec e = instantiate(g);
    OK(cuGraphLaunch(e, s));
    OK(cuGraphLaunch(e, s));
    OK(cuStreamSynchronize(s));
    OK(cuGraphExecDestroy(e));
    OK(cuGraphDestroy(g));
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    EXPECT_CU(cuMemFreeAsync(outside, s), CUDA_ERROR_INVALID_VALUE);
    expect_invalidated(s);
    OK(cuMemFreeAsync(outside, s));
    OK(cuStreamDestroy(s));
}

// C11: a copy from or to pageable host memory cannot be captured.
void capture_rule_host_copies() {
    CUstream s = new_stream();
    CUdeviceptr x = alloc(16, s);
    std::vector<float> h(4, 1.0f);
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    EXPECT_CU(cuMemcpyHtoDAsync(x, h.data(), 16, s), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    expect_invalidated(s);
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    EXPECT_CU(cuMemcpyDtoHAsync(h.data(), x, 16, s), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    expect_invalidated(s);
    // Device-to-device copies and memsets are captured.
    CUdeviceptr y = alloc(16, s);
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuMemsetD8Async(x, 0, 16, s));
    OK(cuMemcpyDtoDAsync(y, x, 16, s));
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    OK(cuGraphDestroy(g));
    OK(cuStreamDestroy(s));
}

// C12: a global or thread-local capture is ended on the thread that began it.
void capture_rule_wrong_thread() {
    CUstream s = new_stream();
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    std::thread other([&] {
        OK(cuCtxSetCurrent(g_ctx));
        CUgraph g;
        EXPECT_CU(cuStreamEndCapture(s, &g), CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD);
    });
    other.join();
    CUgraph g;
    OK(cuStreamEndCapture(s, &g));
    OK(cuGraphDestroy(g));
    OK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_RELAXED));
    std::thread relaxed([&] {
        OK(cuCtxSetCurrent(g_ctx));
        CUgraph h;
        OK(cuStreamEndCapture(s, &h));
        OK(cuGraphDestroy(h));
    });
    relaxed.join();
    OK(cuStreamDestroy(s));
}

// --- deferred streams (run as a child with TRAM_EMU_DEFERRED=1) -----------------

void deferred_streams() {
    CUstream a = new_stream(), b = new_stream();
    const int n = 64;
    CUdeviceptr x = alloc(n * 4, a);
    std::vector<float> h(n, 5.0f);
    OK(cuMemcpyHtoDAsync(x, h.data(), n * 4, a));
    h.assign(n, -1.0f);  // the copy was staged at the call: this does not reach the device
    float v = 1;
    int nn = n;
    OK(launch(fn("emutest_add"), 1, n, {&x, &v, &nn}, a));
    // Nothing orders b after a: b's copy runs now, before a's work.
    std::vector<float> got(n);
    OK(cuMemcpyDtoHAsync(got.data(), x, 4, b));
    EXPECT(std::isnan(got[0]));
    // Ordered by an event, b sees a's work.
    CUevent e;
    OK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
    OK(cuEventRecord(e, a));
    EXPECT_CU(cuEventQuery(e), CUDA_ERROR_NOT_READY);
    OK(cuStreamWaitEvent(b, e, 0));
    OK(cuMemcpyDtoHAsync(got.data(), x, 4, b));
    EXPECT(got[0] == 6.0f);
    OK(cuEventQuery(e));
    OK(cuEventDestroy(e));
    OK(cuStreamDestroy(a));
    OK(cuStreamDestroy(b));
}

// --- schedules (children with other TRAM_EMU_SCHEDULE) ---------------------------

float run_sum(const char* kernel, int blocks) {
    const int n = blocks * 256;
    CUdeviceptr x = alloc(n * 4), part = alloc(blocks * 4), counter = alloc(4), out = alloc(4);
    write(x, std::vector<float>(n, 1.0f));
    OK(cuMemsetD8Async(counter, 0, 4, nullptr));
    int nn = n;
    OK(launch(fn(kernel), blocks, 256, {&x, &nn, &part, &counter, &out}));
    float r = read(out, 1)[0];
    OK(cuMemFreeAsync(x, nullptr));
    OK(cuMemFreeAsync(part, nullptr));
    OK(cuMemFreeAsync(counter, nullptr));
    OK(cuMemFreeAsync(out, nullptr));
    return r;
}

// Prints whether the racy sum came out wrong, for the parent to count.
void child_sum_racy() {
    int wrong = 0;
    for (int k = 0; k < 4; k++) wrong += run_sum("emutest_sum_racy", 16) != 16.0f * 256;
    printf("racy-wrong %d\n", wrong);
    EXPECT(run_sum("emutest_sum", 16) == 16.0f * 256);
}

void child_missing_barrier() {
    CUdeviceptr in = alloc(256 * 4), out = alloc(4);
    write(in, std::vector<float>(256, 1.0f));
    OK(launch(fn("emutest_missing_barrier"), 1, 256, {&in, &out}));
    printf("missing-barrier %g\n", read(out, 1)[0]);
}

void child_kernel(const char* kernel) {
    CUdeviceptr in = alloc(256 * 4), out = alloc(256 * 4);
    write(in, std::vector<float>(256, 1.0f));
    int n = 256;
    if (!strcmp(kernel, "emutest_past_end"))
        OK(launch(fn(kernel), 1, 32, {&in, &n, &out}));
    else if (!strcmp(kernel, "emutest_misaligned") || !strcmp(kernel, "emutest_misaligned_cg"))
        OK(launch(fn(kernel), 1, 32, {&in, &out}));
    else
        OK(launch(fn(kernel), 1, 128, {&out}));
    OK(cuStreamSynchronize(nullptr));
    printf("finished\n");
}

struct Outcome {
    int status = 0;
    std::string out, err;
};

// Runs this binary as a child running `child` with extra environment.
Outcome spawn(const std::string& child, std::vector<std::string> env) {
    int po[2], pe[2];
    if (pipe(po) || pipe(pe)) abort();
    fflush(nullptr);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(po[1], 1);
        dup2(pe[1], 2);
        close(po[0]);
        close(pe[0]);
        for (auto& kv : env) putenv(strdup(kv.c_str()));
        execl("/proc/self/exe", "driver_test", "--child", child.c_str(), (char*)nullptr);
        _exit(127);
    }
    close(po[1]);
    close(pe[1]);
    Outcome o;
    auto drain = [](int fd, std::string& s) {
        char buf[4096];
        ssize_t k;
        while ((k = ::read(fd, buf, sizeof buf)) > 0) s.append(buf, (size_t)k);
        close(fd);
    };
    std::thread t([&] { drain(pe[0], o.err); });
    drain(po[0], o.out);
    t.join();
    waitpid(pid, &o.status, 0);
    return o;
}

// Stopped: by abort(), or by a sanitizer's exit.
bool stopped(const Outcome& o) { return !(WIFEXITED(o.status) && WEXITSTATUS(o.status) == 0); }

bool sanitized() {
    const char* v = getenv("TRAM_EMU_VARIANT");
    return v && !strcmp(v, "sanitize");
}

// Each in-kernel error stops the process and names the kernel, block, thread
// (run in order, so that each is met the same way under every schedule).
void kernel_errors_stop_the_process() {
    struct Case {
        const char* kernel;
        const char* says;
    } cases[] = {
        {"emutest_barrier_after_exit", "__syncthreads() reached after 1 threads of the block exited"},
        {"emutest_divergent_barrier", "threads of one block wait at different __syncthreads()"},
        {"emutest_deadlock", "deadlock in kernel emutest_deadlock"},
        {"emutest_shuffle_exited", "lane 5"},
        {"emutest_misaligned_cg", "misaligned 16-byte access"},
        {"emutest_misaligned", "misaligned address"},
        {"emutest_wild", sanitized() ? "AddressSanitizer" : "memory fault"},
    };
    for (const Case& c : cases) {
        Outcome o = spawn(std::string("kernel:") + c.kernel, {"TRAM_EMU_SCHEDULE=in-order"});
        const bool named = o.err.find(std::string("in kernel ") + c.kernel) != std::string::npos &&
                           o.err.find("block (0,0,0)") != std::string::npos &&
                           o.err.find("thread") != std::string::npos;
        if (!stopped(o) || o.err.find(c.says) == std::string::npos || !named)
            fail("%s: expected an abort saying \"%s\" and naming the kernel, block and thread; got "
                 "status %d, stderr:\n%s",
                 c.kernel, c.says, o.status, o.err.c_str());
    }
    // One element past the end of an allocation: the sanitizer build sees it.
    Outcome o = spawn("kernel:emutest_past_end", {"TRAM_EMU_SCHEDULE=in-order"});
    if (sanitized()) {
        if (!stopped(o) || o.err.find("heap-buffer-overflow") == std::string::npos ||
            o.err.find("emutest_past_end") == std::string::npos)
            fail("past_end: expected ASan's heap-buffer-overflow; status %d, stderr:\n%s", o.status,
                 o.err.c_str());
    } else if (o.status != 0) {
        fail("past_end (not sanitized) should run to the end; status %d:\n%s", o.status, o.err.c_str());
    }
    o = spawn("use_after_free", {"TRAM_EMU_SCHEDULE=in-order"});
    if (sanitized()) {
        if (!stopped(o) || o.err.find("heap-use-after-free") == std::string::npos)
            fail("use after free: expected ASan's report; status %d, stderr:\n%s", o.status, o.err.c_str());
    } else if (o.status != 0 || o.out.find("nan") == std::string::npos) {
        fail("use after free: expected poison (NaN); got %s%s", o.out.c_str(), o.err.c_str());
    }
}

// The schedules find what they are for: in-order sees a missing barrier, the
// random schedule a cross-block ordering bug that in-order cannot.
void schedules_find_their_bugs() {
    Outcome o = spawn("missing_barrier", {"TRAM_EMU_SCHEDULE=in-order"});
    if (o.status != 0 || o.out.find("nan") == std::string::npos)
        fail("in-order: a missing barrier should leave poison in the sum; got %s%s", o.out.c_str(), o.err.c_str());
    o = spawn("sum_racy", {"TRAM_EMU_SCHEDULE=in-order"});
    if (o.status != 0 || o.out.find("racy-wrong 0") == std::string::npos)
        fail("in-order runs blocks one after another: the racy sum comes out right; got %s%s", o.out.c_str(),
             o.err.c_str());
    int caught = 0;
    for (int seed = 1; seed <= 3; seed++) {
        o = spawn("sum_racy", {"TRAM_EMU_SCHEDULE=random:" + std::to_string(seed)});
        if (o.status != 0) fail("random:%d: %s", seed, o.err.c_str());
        caught += o.out.find("racy-wrong 0") == std::string::npos;
    }
    if (caught < 2) fail("random schedules caught the racy last-block sum in %d of 3 seeds", caught);
    o = spawn("sum_racy", {"TRAM_EMU_SCHEDULE=threads:4"});
    if (o.status != 0) fail("threads:4: %s", o.err.c_str());
    o = spawn("deferred", {"TRAM_EMU_DEFERRED=1"});
    if (o.status != 0) fail("deferred streams: status %d\n%s%s", o.status, o.out.c_str(), o.err.c_str());
}

void setup() {
    OK(cuInit(0));
    CUdevice d;
    OK(cuDeviceGet(&d, 0));
    OK(cuDevicePrimaryCtxRetain(&g_ctx, d));
    OK(cuCtxSetCurrent(g_ctx));
    std::string ptx = read_file(TEST_PTX_DIR "/emutest.ptx");
    if (ptx.empty()) {
        fprintf(stderr, "driver_test: no PTX at %s\n", TEST_PTX_DIR "/emutest.ptx");
        exit(2);
    }
    OK(cuModuleLoadData(&g_mod, ptx.c_str()));
}

}  // namespace

int main(int argc, char** argv) {
    setup();
    if (argc == 3 && !strcmp(argv[1], "--child")) {
        std::string c = argv[2];
        g_test = argv[2];
        if (c == "sum_racy") child_sum_racy();
        else if (c == "missing_barrier") child_missing_barrier();
        else if (c == "deferred") deferred_streams();
        else if (c == "use_after_free") child_use_after_free();
        else if (c.rfind("kernel:", 0) == 0) child_kernel(c.c_str() + 7);
        return g_failures ? 1 : 0;
    }
    const std::pair<const char*, void (*)()> tests[] = {
        {"device_and_memory", device_and_memory},
        {"module_refusals", module_refusals},
        {"launch_refusals", launch_refusals},
        {"kernels_compute", kernels_compute},
        {"capture_records_and_replays", capture_records_and_replays},
        {"capture_rule_legacy_stream", capture_rule_legacy_stream},
        {"capture_rule_stream_sync", capture_rule_stream_sync},
        {"capture_rule_context_sync", capture_rule_context_sync},
        {"capture_rule_legacy_implicit", capture_rule_legacy_implicit},
        {"capture_rule_isolation", capture_rule_isolation},
        {"capture_rule_unsafe_calls", capture_rule_unsafe_calls},
        {"capture_rule_captured_event", capture_rule_captured_event},
        {"capture_rule_fork_join", capture_rule_fork_join},
        {"capture_rule_allocations", capture_rule_allocations},
        {"capture_rule_host_copies", capture_rule_host_copies},
        {"capture_rule_wrong_thread", capture_rule_wrong_thread},
        {"kernel_errors_stop_the_process", kernel_errors_stop_the_process},
        {"schedules_find_their_bugs", schedules_find_their_bugs},
    };
    int ran = 0;
    for (auto& [name, f] : tests) {
        g_test = name;
        const int before = g_failures;
        f();
        ran++;
        fprintf(stderr, "driver_test %s ... %s\n", name, g_failures == before ? "ok" : "FAILED");
    }
    fprintf(stderr, "driver_test: %d tests, %d failures\n", ran, g_failures);
    return g_failures ? 1 : 0;
}
