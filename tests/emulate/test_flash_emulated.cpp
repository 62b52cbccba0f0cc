/* The flash-attention kernels of the CUDA backend, forward and backward, run on the host through
 * the warp emulation of warp.h and compared with the double-precision reference of the op harness
 * (tests/ops/reference.c), on a machine without a GPU: what this checks is the kernels' logic
 * (fragment layouts, causal masks, the tile walks over ragged sequences, the online softmax, the
 * backward's three passes and the sum over query heads that share a key/value head). What it
 * cannot check is the hardware (timing, the tensor cores' own summation order, launch limits):
 * tests/gpu/test_attention_cuda.c does that on a GPU.
 *
 * The kernels are the text between the "==== kernels" and "==== host" markers of
 * kernels/cuda/attention.cu and attention_backward.cu, extracted by the Makefile; the launches are
 * redone here as the host code does them. Thresholds: the op harness's for a bf16 device (nmse per
 * output; docs/ops-harness.md): HARNESS_BF16_PRODUCT for the forward, HARNESS_BF16_CHAIN for the
 * backward, whose second products take P and dS rounded to bf16. */
#include <stdio.h>
#include <stdlib.h>

#include "warp.h"

extern "C" {
#include "harness_internal.h" // the thresholds, and reference.h
}

#include "flash_tile.inc" // kFlashQueryTile, from kernels/cuda/flash.cuh

namespace forward_kernels {
#include "attention_kernels.inc"
}
namespace backward_kernels {
#include "attention_backward_kernels.inc"
}

namespace {

int failures = 0;

struct xorshift {
    uint64_t state;
    double uniform() { /* [0, 1) */
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;
        return (double)(state >> 11) / 9007199254740992.0;
    }
    float normal(double sd) { /* Box-Muller */
        const double u = uniform() + 1e-300, v = uniform();
        return (float)(sd * std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v));
    }
};

struct attention_case {
    std::vector<int> lengths;
    int H, KV, D;
};

std::vector<int32_t> tile_table(const std::vector<int32_t> &seq_start, int rows) {
    std::vector<int32_t> table(seq_start.size());
    int next = 0;
    for (size_t s = 0; s + 1 < seq_start.size(); s++) {
        table[s] = next;
        next += (seq_start[s + 1] - seq_start[s] + rows - 1) / rows;
    }
    table.back() = next;
    return table;
}

/* Σ (got − want)² / Σ want² over the rows of tokens that belong to a sequence. */
double nmse(const std::vector<float> &got, const std::vector<double> &want) {
    double diff = 0, ref = 0;
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) return INFINITY;
        diff += (got[i] - want[i]) * (got[i] - want[i]), ref += want[i] * want[i];
    }
    return ref > 0 ? diff / ref : diff;
}

void verdict(const char *name, const attention_case &c, const char *output, double error, double threshold) {
    char shape[160];
    int used = snprintf(shape, sizeof shape, "lengths");
    for (int L : c.lengths) used += snprintf(shape + used, sizeof shape - (size_t)used, " %d", L);
    snprintf(shape + used, sizeof shape - (size_t)used, ", H=%d KV=%d D=%d", c.H, c.KV, c.D);
    if (error <= threshold) {
        printf("  %s %s %s: nmse %.2e\n", name, shape, output, error);
        return;
    }
    printf("FAIL %s: %s %s: nmse %.3g > %g\n", name, shape, output, error, threshold);
    failures++;
}

template <int D> void run_case(const attention_case &c) {
    std::vector<int32_t> seq_start(1, 0);
    for (int L : c.lengths) seq_start.push_back(seq_start.back() + L);
    const int n_seqs = (int)c.lengths.size(), T = seq_start.back(), H = c.H, KV = c.KV;
    const size_t nq = (size_t)T * H * D, nkv = (size_t)T * KV * D;
    xorshift rng{0x9e3779b97f4a7c15ull ^ (uint64_t)(T * 131 + H * 7 + D)};
    std::vector<float> q(nq), k(nkv), v(nkv), dout(nq);
    for (auto &x : q) x = rng.normal(1.5); /* scores of sd ~1.5: softmaxes between flat and peaked */
    for (auto &x : k) x = rng.normal(1.0);
    for (auto &x : v) x = rng.normal(1.0);
    for (auto &x : dout) x = rng.normal(1.0);
    std::vector<double> qd(q.begin(), q.end()), kd(k.begin(), k.end()), vd(v.begin(), v.end()), doutd(dout.begin(), dout.end());
    std::vector<double> want_out(nq), want_dq(nq), want_dk(nkv), want_dv(nkv);
    ref_attention_forward(want_out.data(), qd.data(), kd.data(), vd.data(), seq_start.data(), n_seqs, H, KV, D);
    ref_attention_backward(want_dq.data(), want_dk.data(), want_dv.data(), doutd.data(), qd.data(), kd.data(), vd.data(),
                           seq_start.data(), n_seqs, H, KV, D);

    const std::vector<int32_t> query_tiles = tile_table(seq_start, kFlashQueryTile);
    const std::vector<int32_t> key_tiles = tile_table(seq_start, backward_kernels::kKeyTile);
    const int n_query_tiles = query_tiles.back(), n_key_tiles = key_tiles.back();
    const float scale = 1.0f / std::sqrt((float)D), scale_log2 = (float)(1.4426950408889634 / std::sqrt((double)D));

    // forward (attention.cu's flash_forward)
    std::vector<float> out(nq, NAN);
    emu_launch((unsigned)(n_query_tiles * H), forward_kernels::kThreads, forward_kernels::FlashShape<D>::kSmemBytes, [&] {
        forward_kernels::flash_forward_kernel<D, false>(out.data(), nullptr, nullptr, nullptr, q.data(), k.data(), v.data(),
                                                        seq_start.data(), query_tiles.data(), n_seqs, n_query_tiles, H, KV,
                                                        scale_log2);
    });
    verdict("flash_forward_emulated", c, "out", nmse(out, want_out), HARNESS_BF16_PRODUCT);

    // backward (attention_backward.cu's flash_backward): the stats, the key pass, the query pass
    std::vector<float> lse2((size_t)T * H, NAN), delta((size_t)T * H, NAN);
    emu_launch((unsigned)(n_query_tiles * H), forward_kernels::kThreads, forward_kernels::FlashShape<D>::kSmemBytes, [&] {
        forward_kernels::flash_forward_kernel<D, true>(nullptr, lse2.data(), delta.data(), dout.data(), q.data(), k.data(), v.data(),
                                                       seq_start.data(), query_tiles.data(), n_seqs, n_query_tiles, H, KV,
                                                       scale_log2);
    });
    const int group = H / KV;
    std::vector<float> dq(nq, NAN), dk(nkv, NAN), dv(nkv, NAN);
    std::vector<float> dk_heads(group > 1 ? nq : 0, NAN), dv_heads(group > 1 ? nq : 0, NAN);
    float *dk_to = group > 1 ? dk_heads.data() : dk.data(), *dv_to = group > 1 ? dv_heads.data() : dv.data();
    using Shape = backward_kernels::BackwardShape<D>;
    emu_launch((unsigned)(n_key_tiles * H), backward_kernels::kBwdThreads, Shape::kKeySmem, [&] {
        backward_kernels::flash_key_kernel<D>(dk_to, dv_to, lse2.data(), delta.data(), dout.data(), q.data(), k.data(), v.data(),
                                              seq_start.data(), key_tiles.data(), n_seqs, H, KV, scale_log2, scale);
    });
    emu_launch((unsigned)(n_query_tiles * H), backward_kernels::kBwdThreads, Shape::kQuerySmem, [&] {
        backward_kernels::flash_query_kernel<D>(dq.data(), lse2.data(), delta.data(), dout.data(), q.data(), k.data(), v.data(),
                                                seq_start.data(), query_tiles.data(), n_seqs, n_query_tiles, H, KV, scale_log2,
                                                scale);
    });
    if (group > 1)
        emu_launch(3, 64, 0, [&] {
            backward_kernels::sum_group_heads(dk.data(), dv.data(), dk_heads.data(), dv_heads.data(), 0, (long long)nkv, H, KV, D);
        });
    verdict("flash_backward_emulated", c, "dq", nmse(dq, want_dq), HARNESS_BF16_CHAIN);
    verdict("flash_backward_emulated", c, "dk", nmse(dk, want_dk), HARNESS_BF16_CHAIN);
    verdict("flash_backward_emulated", c, "dv", nmse(dv, want_dv), HARNESS_BF16_CHAIN);
}

} // namespace

int main() {
    /* empty sequences, one of length 1, lengths across the 64-key and 128-query tiles; GQA 2 and
     * 3 (the sum over heads) and 1 (dk, dv stored directly); every head size the kernels take */
    const int before = failures;
    run_case<64>({{1, 129, 0, 200, 64}, 4, 2, 64});
    run_case<128>({{300}, 2, 1, 128});
    run_case<96>({{70, 0, 130}, 3, 3, 96});
    run_case<128>({{65, 127}, 6, 2, 128});
    if (failures == before) printf("PASS flash_attention_emulated\n");
    return failures ? 1 : 0;
}
