// PLACEHOLDER (owned by the convert work): the copy pipeline behind `simg convert`.
public enum Pipeline {}
