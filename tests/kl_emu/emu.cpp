// Host emulation of kernels/kl_div.cu for tests/kl_div_host_emulation.rs: the
// kernel's own numerics (accumulate, merges, finalize, gradient), compiled by
// the host compiler, with one block's threads run one after another and the
// warp shuffles replayed in their order. No GPU needed.
// Usage: emu <input> <output>; formats in tests/kl_div_host_emulation.rs.
#include <cmath>
#include <cstdint>
#include <algorithm>
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#include <vector_types.h>
// Stand-ins for the CUDA keywords and built-ins the kernel file names.
struct Dim { unsigned x, y, z; };
static Dim blockIdx, threadIdx;
template <typename T> T __shfl_down_sync(unsigned, T v, int) { return v; }
inline void __syncthreads() {}
using std::isfinite;
#include "kl_div.cu"
#include <cstdio>
#include <vector>
#include <cstdlib>

template <typename T, bool SYM>
void emulate(int rows, long long vocab, int bpr, float inv_tau, const std::vector<float>& A,
             const std::vector<float>& B, std::vector<double>& kl, std::vector<float>& ga, std::vector<float>& gb) {
    const int N = 16 / sizeof(T);
    long long chunk = bpr == 1 ? vocab : (((vocab + bpr - 1) / bpr + 7) / 8) * 8;
    int nparts = (int)((vocab + chunk - 1) / chunk);
    double itd = inv_tau;
    std::vector<KlRowStats> stats(rows);
    for (int r = 0; r < rows; r++) {
        std::vector<KlPartial> parts(nparts);
        for (int k = 0; k < nparts; k++) {
            long long start = k * chunk, end = std::min(vocab, start + chunk), len = end - start;
            const float* pa = &A[r * vocab + start];
            const float* pb = &B[r * vocab + start];
            std::vector<KlSide> sa(KL_THREADS), sb(KL_THREADS);
            std::vector<unsigned> fl(KL_THREADS);
            long long head = 0;  // the aligned path
            long long nvec = (len - head) / N;
            for (int tid = 0; tid < KL_THREADS; tid++) {
                ThreadAcc<T> t;
                tside_init(t.a);
                tside_init(t.b);
                t.flags = 0;
                for (long long v = tid; v < nvec; v += KL_THREADS) {
                    float ra[16 / sizeof(T)], rb[16 / sizeof(T)];
                    for (int i = 0; i < N; i++) { ra[i] = pa[v * N + i]; rb[i] = pb[v * N + i]; }
                    accumulate<T, SYM, 16 / sizeof(T)>(t, ra, rb, inv_tau);
                }
                for (long long i = nvec * N + tid; i < len; i += KL_THREADS) {
                    float ra[1] = {pa[i]}, rb[1] = {pb[i]};
                    accumulate<T, SYM, 1>(t, ra, rb, inv_tau);
                }
                KlSide x, y;
                x.S = t.a.S; x.A = t.a.A; x.B = t.a.B; x.c = (double)t.a.c; x.O = t.a.O; x.M = t.a.M; x.Mo = t.a.Mo;
                y.S = t.b.S; y.A = t.b.A; y.B = t.b.B; y.c = (double)t.b.c; y.O = 0.0; y.M = t.b.M; y.Mo = -INFINITY;
                sa[tid] = x; sb[tid] = y; fl[tid] = t.flags;
            }
            // warps
            for (int w = 0; w < KL_THREADS / 32; w++) {
                for (int off = 16; off > 0; off >>= 1)
                    for (int lane = 0; lane + off < 32; lane++) {
                        side_merge(sa[w * 32 + lane], sa[w * 32 + lane + off], itd);
                        side_merge(sb[w * 32 + lane], sb[w * 32 + lane + off], itd);
                        fl[w * 32 + lane] |= fl[w * 32 + lane + off];
                    }
            }
            const int W = KL_THREADS / 32;
            std::vector<KlSide> wa(W), wb(W);
            std::vector<unsigned> wf(W);
            for (int w = 0; w < W; w++) { wa[w] = sa[w * 32]; wb[w] = sb[w * 32]; wf[w] = fl[w * 32]; }
            for (int off = W / 2; off > 0; off >>= 1)
                for (int lane = 0; lane + off < W; lane++) {
                    side_merge(wa[lane], wa[lane + off], itd);
                    side_merge(wb[lane], wb[lane + off], itd);
                    wf[lane] |= wf[lane + off];
                }
            parts[k].a = wa[0]; parts[k].b = wb[0]; parts[k].flags = wf[0];
        }
        KlSide a = parts[0].a, b = parts[0].b;
        unsigned f = parts[0].flags;
        for (int k = 1; k < nparts; k++) { side_merge(a, parts[k].a, itd); side_merge(b, parts[k].b, itd); f |= parts[k].flags; }
        finalize_row(a, b, f, SYM, itd, stats[r]);
        kl[r] = stats[r].kl;
        const KlRowStats& st = stats[r];
        GradRow<T> g;
        g.c_f = (typename Wide<T>::type)st.c_f; g.c_r = (typename Wide<T>::type)st.c_r;
        g.Ma = st.Ma; g.logSa = st.logSa; g.Mb = st.Mb; g.logSb = st.logSb;
        g.alpha_f = st.alpha_f; g.L_f = st.L_f; g.alpha_r = st.alpha_r; g.L_r = st.L_r;
        g.inv_tau = inv_tau; g.scale = inv_tau;
        bool bad = !std::isfinite(st.kl);
        for (long long j = 0; j < vocab; j++) {
            float x, y;
            if (bad) { x = y = NAN; } else grad_elem<T, SYM>(g, A[r * vocab + j], B[r * vocab + j], x, y);
            ga[r * vocab + j] = x; gb[r * vocab + j] = y;
        }
    }
}

int main(int argc, char** argv) {
    FILE* f = fopen(argv[1], "rb");
    int hdr[4]; float inv_tau;
    fread(hdr, 4, 4, f); fread(&inv_tau, 4, 1, f);
    int rows = hdr[0], vocab = hdr[1], sym = hdr[2], dt = hdr[3] & 3, bpr = hdr[3] >> 2;
    std::vector<float> A((size_t)rows * vocab), B((size_t)rows * vocab);
    fread(A.data(), 4, A.size(), f); fread(B.data(), 4, B.size(), f); fclose(f);
    std::vector<double> kl(rows); std::vector<float> ga(A.size()), gb(A.size());
#define RUN(T) (sym ? emulate<T, true>(rows, vocab, bpr, inv_tau, A, B, kl, ga, gb) : emulate<T, false>(rows, vocab, bpr, inv_tau, A, B, kl, ga, gb))
    if (dt == 0) RUN(float); else if (dt == 1) RUN(f16); else RUN(bf16);
    FILE* o = fopen(argv[2], "wb");
    fwrite(kl.data(), 8, rows, o); fwrite(ga.data(), 4, ga.size(), o); fwrite(gb.data(), 4, gb.size(), o); fclose(o);
    return 0;
}
