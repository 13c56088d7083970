// AEGIS-128L (draft-irtf-cfrg-aegis-aead, 128-bit tags) for sealing KV store entries: one pass over
// the entry, about 8 AES rounds per 32 bytes, so it opens at memory speed where AES-GCM (14 rounds per
// 16 bytes plus GHASH) runs at a third of it. x86-64 with AES-NI only (checked at run time: `available`);
// elsewhere the store seals with AES-256-GCM. The GIL is released while it runs, so the store's load
// threads open entries on several cores at once.
//
// The state update, Enc/Dec, DecPartial and Finalize follow the draft's pseudocode one to one (the
// names are the draft's); kvapi/store/aegis.py checks the draft's test vectors on first use.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>

namespace py = pybind11;

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace {

#define AEGIS_TARGET __attribute__((target("aes,sse2")))

struct State {
  __m128i s0, s1, s2, s3, s4, s5, s6, s7;
};

AEGIS_TARGET inline void update(State& st, __m128i m0, __m128i m1) {
  const __m128i t7 = st.s7;
  st.s7 = _mm_aesenc_si128(st.s6, st.s7);
  st.s6 = _mm_aesenc_si128(st.s5, st.s6);
  st.s5 = _mm_aesenc_si128(st.s4, st.s5);
  st.s4 = _mm_aesenc_si128(st.s3, _mm_xor_si128(st.s4, m1));
  st.s3 = _mm_aesenc_si128(st.s2, st.s3);
  st.s2 = _mm_aesenc_si128(st.s1, st.s2);
  st.s1 = _mm_aesenc_si128(st.s0, st.s1);
  st.s0 = _mm_aesenc_si128(t7, _mm_xor_si128(st.s0, m0));
}

AEGIS_TARGET inline __m128i z0_of(const State& st) {
  return _mm_xor_si128(_mm_xor_si128(st.s6, st.s1), _mm_and_si128(st.s2, st.s3));
}

AEGIS_TARGET inline __m128i z1_of(const State& st) {
  return _mm_xor_si128(_mm_xor_si128(st.s2, st.s5), _mm_and_si128(st.s6, st.s7));
}

AEGIS_TARGET inline __m128i load(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

AEGIS_TARGET inline void store(uint8_t* p, __m128i v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }

AEGIS_TARGET void init(State& st, const uint8_t* key, const uint8_t* nonce, const uint8_t* ad, size_t ad_len) {
  static const uint8_t c0_bytes[16] = {0x00, 0x01, 0x01, 0x02, 0x03, 0x05, 0x08, 0x0d,
                                       0x15, 0x22, 0x37, 0x59, 0x90, 0xe9, 0x79, 0x62};
  static const uint8_t c1_bytes[16] = {0xdb, 0x3d, 0x18, 0x55, 0x6d, 0xc2, 0x2f, 0xf1,
                                       0x20, 0x11, 0x31, 0x42, 0x73, 0xb5, 0x28, 0xdd};
  const __m128i k = load(key), n = load(nonce), c0 = load(c0_bytes), c1 = load(c1_bytes);
  st.s0 = _mm_xor_si128(k, n);
  st.s1 = c1;
  st.s2 = c0;
  st.s3 = c1;
  st.s4 = _mm_xor_si128(k, n);
  st.s5 = _mm_xor_si128(k, c0);
  st.s6 = _mm_xor_si128(k, c1);
  st.s7 = _mm_xor_si128(k, c0);
  for (int i = 0; i < 10; ++i) update(st, n, k);
  size_t i = 0;
  for (; i + 32 <= ad_len; i += 32) update(st, load(ad + i), load(ad + i + 16));  // Absorb
  if (i < ad_len) {
    uint8_t pad[32] = {0};
    std::memcpy(pad, ad + i, ad_len - i);
    update(st, load(pad), load(pad + 16));
  }
}

AEGIS_TARGET __m128i finalize(State& st, size_t ad_len, size_t msg_len) {
  const __m128i lens = _mm_set_epi64x(static_cast<long long>(uint64_t(msg_len) * 8),
                                      static_cast<long long>(uint64_t(ad_len) * 8));  // LE64(ad) || LE64(msg)
  const __m128i t = _mm_xor_si128(st.s2, lens);
  for (int i = 0; i < 7; ++i) update(st, t, t);
  __m128i tag = _mm_xor_si128(st.s0, st.s1);
  tag = _mm_xor_si128(tag, st.s2);
  tag = _mm_xor_si128(tag, st.s3);
  tag = _mm_xor_si128(tag, st.s4);
  tag = _mm_xor_si128(tag, st.s5);
  return _mm_xor_si128(tag, st.s6);
}

AEGIS_TARGET void encrypt(const uint8_t* key, const uint8_t* nonce, const uint8_t* ad, size_t ad_len,
                          const uint8_t* msg, size_t len, uint8_t* ct, uint8_t* tag) {
  State st;
  init(st, key, nonce, ad, ad_len);
  size_t i = 0;
  for (; i + 32 <= len; i += 32) {  // Enc
    const __m128i t0 = load(msg + i), t1 = load(msg + i + 16);
    const __m128i out0 = _mm_xor_si128(t0, z0_of(st)), out1 = _mm_xor_si128(t1, z1_of(st));
    update(st, t0, t1);
    store(ct + i, out0);
    store(ct + i + 16, out1);
  }
  if (i < len) {  // Enc of the zero-padded last block, truncated
    uint8_t pad[32] = {0};
    std::memcpy(pad, msg + i, len - i);
    const __m128i t0 = load(pad), t1 = load(pad + 16);
    store(pad, _mm_xor_si128(t0, z0_of(st)));
    store(pad + 16, _mm_xor_si128(t1, z1_of(st)));
    update(st, t0, t1);
    std::memcpy(ct + i, pad, len - i);
  }
  store(tag, finalize(st, ad_len, len));
}

AEGIS_TARGET bool decrypt(const uint8_t* key, const uint8_t* nonce, const uint8_t* ad, size_t ad_len,
                          const uint8_t* ct, size_t len, const uint8_t* tag, uint8_t* msg) {
  State st;
  init(st, key, nonce, ad, ad_len);
  size_t i = 0;
  for (; i + 32 <= len; i += 32) {  // Dec
    const __m128i out0 = _mm_xor_si128(load(ct + i), z0_of(st));
    const __m128i out1 = _mm_xor_si128(load(ct + i + 16), z1_of(st));
    update(st, out0, out1);
    store(msg + i, out0);
    store(msg + i + 16, out1);
  }
  if (i < len) {  // DecPartial
    uint8_t pad[32] = {0};
    std::memcpy(pad, ct + i, len - i);
    store(pad, _mm_xor_si128(load(pad), z0_of(st)));
    store(pad + 16, _mm_xor_si128(load(pad + 16), z1_of(st)));
    std::memcpy(msg + i, pad, len - i);
    std::memset(pad + (len - i), 0, 32 - (len - i));
    update(st, load(pad), load(pad + 16));
  }
  const __m128i expected = finalize(st, ad_len, len);
  const bool ok = _mm_movemask_epi8(_mm_cmpeq_epi8(expected, load(tag))) == 0xFFFF;  // constant time
  if (!ok) std::memset(msg, 0, len);  // the draft: a message that fails its tag is never given out
  return ok;
}

bool cpu_has_aes() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("aes") && __builtin_cpu_supports("sse2");
}

}  // namespace

#else  // not x86-64: the store seals with AES-GCM

namespace {
bool cpu_has_aes() { return false; }
void encrypt(const uint8_t*, const uint8_t*, const uint8_t*, size_t, const uint8_t*, size_t, uint8_t*, uint8_t*) {}
bool decrypt(const uint8_t*, const uint8_t*, const uint8_t*, size_t, const uint8_t*, size_t, const uint8_t*, uint8_t*) {
  return false;
}
}  // namespace

#endif

namespace {

struct View {
  const uint8_t* ptr;
  size_t len;
};

View view(const py::buffer& b, bool writable, size_t want, const char* what) {
  py::buffer_info info = b.request(writable);
  if (info.ndim != 1 || info.itemsize != 1 || (info.ndim == 1 && info.strides[0] != 1))
    throw py::value_error(std::string(what) + ": a contiguous byte buffer is needed");
  const size_t n = static_cast<size_t>(info.size);
  if (want != SIZE_MAX && n != want)
    throw py::value_error(std::string(what) + ": " + std::to_string(want) + " bytes are needed, not " +
                          std::to_string(n));
  return {static_cast<const uint8_t*>(info.ptr), n};
}

void seal(const py::buffer& key, const py::buffer& nonce, const py::buffer& ad, const py::buffer& msg,
          const py::buffer& ct, const py::buffer& tag) {
  if (!cpu_has_aes()) throw std::runtime_error("AEGIS-128L needs AES-NI");
  const View k = view(key, false, 16, "key"), n = view(nonce, false, 16, "nonce"), a = view(ad, false, SIZE_MAX, "ad");
  const View m = view(msg, false, SIZE_MAX, "msg");
  const View c = view(ct, true, m.len, "ct"), t = view(tag, true, 16, "tag");
  py::gil_scoped_release released;
  encrypt(k.ptr, n.ptr, a.ptr, a.len, m.ptr, m.len, const_cast<uint8_t*>(c.ptr), const_cast<uint8_t*>(t.ptr));
}

bool open(const py::buffer& key, const py::buffer& nonce, const py::buffer& ad, const py::buffer& ct,
          const py::buffer& tag, const py::buffer& msg) {
  if (!cpu_has_aes()) throw std::runtime_error("AEGIS-128L needs AES-NI");
  const View k = view(key, false, 16, "key"), n = view(nonce, false, 16, "nonce"), a = view(ad, false, SIZE_MAX, "ad");
  const View c = view(ct, false, SIZE_MAX, "ct"), t = view(tag, false, 16, "tag");
  const View m = view(msg, true, c.len, "msg");
  py::gil_scoped_release released;
  return decrypt(k.ptr, n.ptr, a.ptr, a.len, c.ptr, c.len, t.ptr, const_cast<uint8_t*>(m.ptr));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "AEGIS-128L with 128-bit tags (draft-irtf-cfrg-aegis-aead), for sealing KV store entries";
  m.def("available", &cpu_has_aes, "whether this CPU runs it (x86-64 with AES-NI)");
  m.def("seal", &seal, "seal(key, nonce, ad, msg, ct, tag): ct = the encrypted msg, tag its 16-byte tag",
        py::arg("key"), py::arg("nonce"), py::arg("ad"), py::arg("msg"), py::arg("ct"), py::arg("tag"));
  m.def("open", &open, "open(key, nonce, ad, ct, tag, msg): whether the tag holds (msg is zeroed if not)",
        py::arg("key"), py::arg("nonce"), py::arg("ad"), py::arg("ct"), py::arg("tag"), py::arg("msg"));
}
