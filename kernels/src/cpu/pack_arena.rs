//! Memory for the native classes' packed weights: one arena per backend, packings appended in
//! the order of their first use. The backend's vectors (norm weights, biases), widened to f32 at
//! load, lie there too, before the packings.
//!
//! # Why
//!
//! A batch-1 decode step streams every weight once, in the same order every step, and a native
//! class reads each weight from a packed copy made at its first call (which is in step order
//! too). As separate `Vec`s those copies were separate mappings, often at descending addresses,
//! aligned to 16 bytes only (malloc's: large ones start 16 bytes past a page, so every 64-byte
//! load of a tile straddled two cache lines),
//! and a tile's software prefetch stopped at each packing's end. In one arena the packings lie
//! back to back in step order on cache lines, and a step reads one ascending run of memory on
//! 2 MiB pages. With the block-weight tile of that time (a 48 KB software prefetch, bounded by
//! the chunk's end so that it ran on into the next weight) the SmolLM2 decode step's linears went
//! from 17–19 to 19–22 GB/s on one thread (BENCHMARKS §17.1); the interleaved block-weight layout
//! that followed needs no software prefetch, and there the arena measured within noise of
//! separate buffers. It stays: it costs no memory, and a step's weights in one stream is what
//! any prefetch across weights needs.
//!
//! # Layout
//!
//! A chunk reserves address space (`mmap` `MAP_NORESERVE`, [`CHUNK_BYTES`]) and commits nothing:
//! only the pages a packing writes become resident, so a model costs what its packings hold
//! (plus at most one partly used 2 MiB page per chunk), as separate buffers did. Packings start
//! on a cache line ([`PACKING_ALIGN`]): a tile's 64-byte loads never straddle two lines. A packing
//! that does not fit the current chunk starts a new one (at least its own size); the rest of the
//! old chunk is never touched. A chunk is unmapped when its last packing is dropped, which may be
//! after the backend. Packings made for one call only (a bare view's) take a chunk of their own.
//!
//! The contents are the packing's words: where they live changes no bit.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Address space one chunk reserves (nothing is committed until written).
#[cfg(target_os = "linux")]
const CHUNK_BYTES: usize = 1 << 30;

/// Where each packing starts: a cache line.
pub(crate) const PACKING_ALIGN: usize = 64;

/// A zeroed region of address space, resident only where written.
struct Chunk {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the chunk is plain memory; its regions are handed out disjointly (each to one
// `PackedWords`, which alone writes it, through `&mut`), and reads go through `&` of the owner.
unsafe impl Send for Chunk {}
// SAFETY: as for `Send`.
unsafe impl Sync for Chunk {}

impl Chunk {
    /// `len` (> 0) bytes of zeros, on 2 MiB pages where Linux grants them.
    fn new(len: usize) -> Chunk {
        assert!(len > 0);
        #[cfg(target_os = "linux")]
        {
            // SAFETY: a fresh private anonymous mapping; the hint covers exactly that mapping.
            let base = unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    std::alloc::handle_alloc_error(Self::layout(len));
                }
                // Before the first write faults the pages in: a decode step streams every weight
                // once, and 4 KiB pages cost it a TLB miss per page (BENCHMARKS §2.2).
                libc::madvise(p, len, libc::MADV_HUGEPAGE);
                p as *mut u8
            };
            Chunk { base: NonNull::new(base).expect("mmap returned a null mapping"), len }
        }
        #[cfg(not(target_os = "linux"))]
        {
            // SAFETY: a non-zero size.
            let base = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
            let base = NonNull::new(base).unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(len)));
            Chunk { base, len }
        }
    }
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len, 4096).expect("a chunk's size fits a layout")
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: the mapping (allocation) made in `new`, released once, when no packing refers
        // to it any more.
        unsafe {
            #[cfg(target_os = "linux")]
            libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.len);
            #[cfg(not(target_os = "linux"))]
            std::alloc::dealloc(self.base.as_ptr(), Self::layout(self.len));
        }
    }
}

/// One packing's words: a region of a chunk that only this value reads and writes (as a slice).
pub(crate) struct PackedWords {
    chunk: Arc<Chunk>,
    /// Byte offset of the first word in the chunk.
    start: usize,
    /// Length in words.
    len: usize,
}

impl PackedWords {
    /// `len` zeroed words in a chunk of their own (a packing made for one call).
    pub(crate) fn standalone(len: usize) -> PackedWords {
        PackedWords { chunk: Arc::new(Chunk::new((4 * len).max(1))), start: 0, len }
    }
    /// `len` zeroed words in a chunk of their own, starting on a 2 MiB boundary, so that every
    /// word from the first lies on 2 MiB pages where Linux grants them (a mapping's own start is
    /// only page-aligned, and the pages before its first 2 MiB boundary stay 4 KiB). Reserves
    /// 2 MiB more address space than it uses, never committed.
    pub(crate) fn on_huge_pages(len: usize) -> PackedWords {
        const HUGE_PAGE: usize = 2 << 20;
        let chunk = Chunk::new(4 * len + HUGE_PAGE);
        let base = chunk.base.as_ptr() as usize;
        PackedWords { chunk: Arc::new(chunk), start: base.next_multiple_of(HUGE_PAGE) - base, len }
    }
    /// The end of the packing's chunk (tests tell chunks apart by it).
    #[cfg(test)]
    fn chunk_end(&self) -> *const u8 {
        self.chunk.base.as_ptr().wrapping_add(self.chunk.len)
    }
}

impl Deref for PackedWords {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        // SAFETY: `start..start + 4·len` lies inside the chunk, is aligned for u32 and zeroed at
        // creation (a valid u32 everywhere); only this value hands out references to it.
        unsafe { std::slice::from_raw_parts(self.chunk.base.as_ptr().add(self.start) as *const u32, self.len) }
    }
}

impl DerefMut for PackedWords {
    fn deref_mut(&mut self) -> &mut [u32] {
        // SAFETY: as for `deref`; `&mut self` makes this the region's only reference.
        unsafe { std::slice::from_raw_parts_mut(self.chunk.base.as_ptr().add(self.start) as *mut u32, self.len) }
    }
}

/// The words as bytes: a vector weight kept in the arena is a `HostWeight`'s owner.
impl AsRef<[u8]> for PackedWords {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as for `deref`, viewed as its bytes (any bit pattern is a valid u8).
        unsafe { std::slice::from_raw_parts(self.chunk.base.as_ptr().add(self.start), 4 * self.len) }
    }
}

/// The backend's arena: the chunk packings are appended to, and how much of it is handed out.
#[derive(Default)]
pub(crate) struct PackArena {
    current: Mutex<Option<(Arc<Chunk>, usize)>>,
}

impl PackArena {
    /// `len` zeroed words right after the previous packing (on the next cache line).
    pub(crate) fn alloc(&self, len: usize) -> PackedWords {
        #[cfg(not(target_os = "linux"))]
        {
            // Without a way to reserve address space cheaply, a packing keeps its own memory.
            let _ = &self.current;
            PackedWords::standalone(len)
        }
        #[cfg(target_os = "linux")]
        {
            let bytes = 4 * len;
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            let start = match &*current {
                Some((chunk, used)) if used.next_multiple_of(PACKING_ALIGN) + bytes <= chunk.len => {
                    used.next_multiple_of(PACKING_ALIGN)
                }
                _ => {
                    *current = Some((Arc::new(Chunk::new(bytes.max(CHUNK_BYTES))), 0));
                    0
                }
            };
            let (chunk, used) = current.as_mut().expect("a chunk was just made");
            *used = start + bytes;
            PackedWords { chunk: chunk.clone(), start, len }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_packings_lie_back_to_back_on_cache_lines_and_never_overlap() {
        let arena = PackArena::default();
        let mut a = arena.alloc(1000);
        let mut b = arena.alloc(7);
        let c = arena.alloc(16);
        for (w, v) in [(&mut a, 1u32), (&mut b, 2)] {
            assert!(w.iter().all(|&x| x == 0), "fresh words are zero");
            w.fill(v);
        }
        assert!(a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2) && c.iter().all(|&x| x == 0));
        for w in [&a, &b, &c] {
            assert_eq!(w.as_ptr() as usize % PACKING_ALIGN, 0);
        }
        #[cfg(target_os = "linux")]
        {
            let (pa, pb, pc) = (a.as_ptr() as usize, b.as_ptr() as usize, c.as_ptr() as usize);
            assert_eq!(pb, (pa + 4000).next_multiple_of(PACKING_ALIGN), "b follows a");
            assert_eq!(pc, (pb + 28).next_multiple_of(PACKING_ALIGN), "c follows b");
            assert_eq!(a.chunk_end(), c.chunk_end(), "one chunk");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_packing_larger_than_what_is_left_of_a_chunk_starts_a_chunk_of_its_own_size() {
        let arena = PackArena::default();
        let small = arena.alloc(16);
        let huge = arena.alloc(CHUNK_BYTES / 4); // exactly one chunk of bytes: it cannot follow `small`
        assert_ne!(small.chunk_end(), huge.chunk_end());
        assert_eq!(huge.chunk_end(), (huge.as_ptr() as *const u8).wrapping_add(4 * huge.len()));
        let next = arena.alloc(16);
        assert_ne!(next.chunk_end(), huge.chunk_end(), "the full chunk takes no more packings");
    }

    #[test]
    fn words_on_huge_pages_start_on_a_2_mib_boundary_and_are_zero() {
        for len in [1, 1000, (3 << 20) / 4 + 5] {
            let mut w = PackedWords::on_huge_pages(len);
            assert_eq!(w.len(), len);
            assert_eq!(w.as_ptr() as usize % (2 << 20), 0, "{len} words");
            assert!(w.iter().all(|&x| x == 0), "fresh words are zero");
            w.fill(3);
            assert!(w.chunk_end() >= (w.as_ptr() as *const u8).wrapping_add(4 * len), "inside its chunk");
        }
    }

    #[test]
    fn packings_outlive_their_arena() {
        let arena = PackArena::default();
        let mut w = arena.alloc(64);
        drop(arena);
        w.fill(7);
        assert!(w.iter().all(|&x| x == 7));
    }
}
