// Negative control for bench/peers.sh: is llama.cpp batch-invariant?
//
// Evaluates one fixed sequence (a prompt, then teacher-forced decode steps, so every run sees the
// same tokens whatever it would have sampled) under several batch configurations of libllama and
// compares its logits bit for bit against a baseline run: the same sequence alone, again (run to
// run), inside a crowd of other sequences in the same batches, at one thread, and with a small
// physical batch (the prompt split into ubatches). A batch-invariant engine shows 0 differing
// logits in every row; llama.cpp picks kernels by batch shape (and quantizes activations for
// quantized weights), so it usually does not.
//
// Usage: batch_invariance MODEL.gguf [PROMPT_TOKENS] [DECODE_STEPS] [THREADS] [CROWD]

#include "llama.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct RunConfig {
    std::string name;
    int threads;
    int ubatch;
    int crowd;  // other sequences sharing every batch with sequence 0
};

// Token ids of sequence `seq` at position `pos`: spread over the vocabulary, distinct per
// sequence, the same formula as `lockstep bench` uses for its prompts.
llama_token token_at(int seq, int pos, int vocab) {
    const unsigned span = static_cast<unsigned>(vocab - 3);
    return static_cast<llama_token>(3 + (static_cast<unsigned>(pos) * 7919u + static_cast<unsigned>(seq) * 104729u) % span);
}

// Sequence 0's logits at the last prompt position and after each decode step, concatenated.
std::vector<float> run(llama_model *model, const RunConfig &cfg, int prompt_tokens, int decode_steps) {
    const llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    const int seqs = 1 + cfg.crowd;
    const int per_seq = prompt_tokens + decode_steps + 1;

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = static_cast<uint32_t>(seqs * per_seq + 256);
    cp.n_batch = static_cast<uint32_t>(seqs * prompt_tokens);
    cp.n_ubatch = static_cast<uint32_t>(cfg.ubatch);
    cp.n_seq_max = static_cast<uint32_t>(seqs);
    cp.n_threads = cfg.threads;
    cp.n_threads_batch = cfg.threads;
    llama_context *ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        std::fprintf(stderr, "llama_init_from_model failed (%s)\n", cfg.name.c_str());
        std::exit(1);
    }

    std::vector<float> out;
    llama_batch batch = llama_batch_init(seqs * prompt_tokens, 0, 1);
    auto add = [&](llama_token tok, int pos, int seq, bool logits) {
        const int i = batch.n_tokens++;
        batch.token[i] = tok;
        batch.pos[i] = pos;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = seq;
        batch.logits[i] = logits;
    };
    auto keep_seq0 = [&](int index) {
        const float *l = llama_get_logits_ith(ctx, index);
        out.insert(out.end(), l, l + n_vocab);
    };

    // Sequence 0 first in the batch, so its rows sit at the same place in every configuration.
    for (int s = 0; s < seqs; ++s) {
        for (int p = 0; p < prompt_tokens; ++p) {
            add(token_at(s, p, n_vocab), p, s, p == prompt_tokens - 1);
        }
    }
    if (llama_decode(ctx, batch) != 0) {
        std::fprintf(stderr, "llama_decode (prefill) failed (%s)\n", cfg.name.c_str());
        std::exit(1);
    }
    keep_seq0(prompt_tokens - 1);
    for (int step = 0; step < decode_steps; ++step) {
        batch.n_tokens = 0;
        for (int s = 0; s < seqs; ++s) {
            add(token_at(s + 1000, step, n_vocab), prompt_tokens + step, s, true);
        }
        if (llama_decode(ctx, batch) != 0) {
            std::fprintf(stderr, "llama_decode (step %d) failed (%s)\n", step, cfg.name.c_str());
            std::exit(1);
        }
        keep_seq0(0);
    }
    llama_batch_free(batch);
    llama_free(ctx);
    return out;
}

void silent_log(ggml_log_level, const char *, void *) {}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL.gguf [PROMPT_TOKENS] [DECODE_STEPS] [THREADS] [CROWD]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    const int prompt_tokens = argc > 2 ? std::atoi(argv[2]) : 64;
    const int decode_steps = argc > 3 ? std::atoi(argv[3]) : 8;
    const int threads = argc > 4 ? std::atoi(argv[4]) : 2;
    const int crowd = argc > 5 ? std::atoi(argv[5]) : 7;

    llama_log_set(silent_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model *model = llama_model_load_from_file(path, mp);
    if (model == nullptr) {
        std::fprintf(stderr, "cannot load %s\n", path);
        return 1;
    }

    const RunConfig base{"alone", threads, 512, 0};
    const std::vector<RunConfig> others = {
        {"alone, run again", threads, 512, 0},
        {"in a batch with " + std::to_string(crowd) + " other sequences", threads, 512, crowd},
        {"alone, 1 thread", 1, 512, 0},
        {"alone, ubatch 16 (prompt in chunks)", threads, 16, 0},
    };
    const std::vector<float> ref = run(model, base, prompt_tokens, decode_steps);
    std::printf("| llama.cpp: sequence 0 vs alone (%d threads, ubatch 512) | logits compared | differing | max abs diff |\n",
                threads);
    std::printf("| --- | --- | --- | --- |\n");
    int varying = 0;
    for (const RunConfig &cfg : others) {
        const std::vector<float> got = run(model, cfg, prompt_tokens, decode_steps);
        size_t differing = 0;
        double max_abs = 0.0;
        for (size_t i = 0; i < ref.size(); ++i) {
            uint32_t a = 0;
            uint32_t b = 0;
            std::memcpy(&a, &ref[i], 4);
            std::memcpy(&b, &got[i], 4);
            if (a != b) {
                ++differing;
                max_abs = std::fmax(max_abs, std::fabs(static_cast<double>(ref[i]) - static_cast<double>(got[i])));
            }
        }
        varying += differing > 0;
        std::printf("| %s | %zu | %zu | %.3g |\n", cfg.name.c_str(), ref.size(), differing, max_abs);
    }
    std::printf("\nconfigurations whose logits differ from the alone run: %d of %zu\n", varying, others.size());
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
