/* model.h - the model's internal structs, shared by the format readers and the forward pass. */
#ifndef TINYLLM_MODEL_H
#define TINYLLM_MODEL_H

#include "internal.h"
#include "kernels.h"

typedef struct {
    const float *rms_att;   /* (dim) attention RMSNorm weight */
    const float *rms_ffn;   /* (dim) FFN RMSNorm weight */
    tl_matrix wq, wk, wv, wo; /* (dim,dim) (kv_dim,dim) (kv_dim,dim) (dim,dim) */
    tl_matrix w1, w2, w3;     /* (hidden,dim) (dim,hidden) (hidden,dim) */
} tl_layer;

/* A tokenizer stored in the model file (GGUF tokenizer.ggml.*): views into the mapping, all
 * lengths validated by the reader. n == 0 when the file holds none. */
typedef struct {
    int n;                        /* pieces */
    const unsigned char *tokens;  /* n strings, each uint64 length + UTF-8 bytes (U+2581 for spaces) */
    const unsigned char *scores;  /* n float32, or NULL */
    const unsigned char *types;   /* n int32 (SentencePiece type numbering), or NULL */
    int bos, eos, unk;            /* -1 when not given */
    int add_space_prefix;         /* SentencePiece's add_dummy_prefix */
    int remove_extra_whitespaces;
} tl_embedded_vocab;

struct tl_model {
    tl_config config;
    tl_mapped_file file;      /* the weights point into this mapping */
    tl_matrix token_embedding; /* (vocab, dim) */
    tl_matrix classifier;      /* (vocab, dim); the embedding when shared */
    const float *rms_final;    /* (dim) */
    tl_layer *layers;          /* n_layers */
    double *rope_freq;         /* (head_dim/2) theta^(-2i/head_dim); sessions turn it into cos/sin per step */
    float *owned;              /* weights a reader converted (e.g. f16 norms to f32), freed with the model */
    tl_embedded_vocab vocab;
};

/* Check hyper-parameters read from a file; fills a message naming the bad field. The Python readers
 * apply the same rules (ModelConfig.validate in python/tinyllm/config.py): change them together. */
tl_status tl_config_validate(const tl_config *c, const char *path);

/* The model a session runs. */
const tl_model *tl_session_model(const tl_session *s);

/* Readers: fill model from the mapped file (model->file already set). */
tl_status tl_load_llama2c(tl_model *model, const char *path);
tl_status tl_load_gguf(tl_model *model, const char *path);
/* The file starts with GGUF's magic. */
int tl_is_gguf(const tl_mapped_file *f);

#endif
