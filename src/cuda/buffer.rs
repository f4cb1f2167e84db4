//! Device buffers by address: what the launchers pass to kernels.
//!
//! A [`DevRef`] (read) or [`DevMut`] (written) holds a buffer's device address
//! and length, taken once from a cudarc slice or view when it is built, and
//! borrows that slice for as long as it lives. Launches pass the address as a
//! plain kernel argument: no cudarc event is recorded or waited on, so a
//! launch can be captured into a CUDA graph with event tracking on (see
//! [`CudaBackend`](super::CudaBackend) for the stream-ordering contract this
//! implies). Build them before a capture begins: taking the address is a
//! cudarc access that orders the slice's own stream with its last use.
//!
//! Framework backends holding raw device pointers use
//! [`DevRef::from_raw`] / [`DevMut::from_raw`] (`unsafe`: the caller vouches
//! for the memory).

use std::marker::PhantomData;

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice};

/// A device buffer that launches read: `len` elements of `T` at `ptr`,
/// borrowed for `'a`.
#[derive(Debug)]
pub struct DevRef<'a, T> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a [T]>,
}

impl<T> Clone for DevRef<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for DevRef<'_, T> {}

/// A device buffer that launches write (and may read): `len` elements of `T`
/// at `ptr`, borrowed mutably for `'a`.
#[derive(Debug)]
pub struct DevMut<'a, T> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<'a, T> DevRef<'a, T> {
    /// The address of a `CudaSlice`, `CudaView` or `CudaViewMut`, borrowed for `'a`.
    pub fn new<S: DevicePtr<T>>(slice: &'a S) -> Self {
        let (ptr, _record) = slice.device_ptr(slice.stream());
        Self {
            ptr,
            len: slice.len(),
            _borrow: PhantomData,
        }
    }

    /// The address of a view, which borrows its slice for `'a`.
    pub fn from_view(view: CudaView<'a, T>) -> Self {
        let (ptr, _record) = view.device_ptr(view.stream());
        Self {
            ptr,
            len: view.len(),
            _borrow: PhantomData,
        }
    }

    /// A buffer by raw address (a framework's tensor storage).
    ///
    /// # Safety
    /// For as long as launches that use it may run (graph replays included),
    /// `ptr` must address `len` readable elements of `T` in the backend's
    /// context (any address when `len` is 0), ordered with the backend's
    /// stream as [`CudaBackend`](super::CudaBackend) describes.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        Self {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<'a, T> DevMut<'a, T> {
    /// The address of a `CudaSlice` or `CudaViewMut`, borrowed mutably for `'a`.
    pub fn new<S: DevicePtrMut<T>>(slice: &'a mut S) -> Self {
        let len = slice.len();
        let stream = slice.stream().clone();
        let (ptr, _record) = slice.device_ptr_mut(&stream);
        Self {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    /// The address of a mutable view, which borrows its slice for `'a`.
    pub fn from_view(mut view: CudaViewMut<'a, T>) -> Self {
        let len = view.len();
        let stream = view.stream().clone();
        let (ptr, _record) = view.device_ptr_mut(&stream);
        Self {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    /// A buffer by raw address (a framework's tensor storage).
    ///
    /// # Safety
    /// As [`DevRef::from_raw`], and the elements must be writable and not
    /// accessed by anything else while launches that write them may run.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        Self {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    /// The same buffer, read-only, for a shorter borrow.
    pub fn as_ref(&self) -> DevRef<'_, T> {
        DevRef {
            ptr: self.ptr,
            len: self.len,
            _borrow: PhantomData,
        }
    }

    /// The same buffer, writable, for a shorter borrow.
    pub fn reborrow(&mut self) -> DevMut<'_, T> {
        DevMut {
            ptr: self.ptr,
            len: self.len,
            _borrow: PhantomData,
        }
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
