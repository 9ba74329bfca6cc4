//! `#[kiln_sdk::handler]`: turns one Rust function into the exports of kiln's
//! `function` world. Use it through `kiln-sdk`, which re-exports it.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::quote;
use syn::parse::{Parse, ParseStream};
use syn::{Error, FnArg, ItemFn, Path, ReturnType, Token, parse_macro_input};

/// Marks the function that handles each invocation.
///
/// The function must have the shape `fn(E, &kiln_sdk::Context) -> Result<R, Er>`
/// where `E: serde::de::DeserializeOwned`, `R: serde::Serialize` and
/// `Er: Into<kiln_sdk::Error>`. One crate has exactly one handler.
///
/// `#[handler(init = path::to::setup)]` names an init hook
/// `fn() -> Result<(), Er>` run once per execution environment.
#[proc_macro_attribute]
pub fn handler(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = parse_macro_input!(attr as HandlerArgs);
    let func = parse_macro_input!(item as ItemFn);
    match expand(args, func) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

struct HandlerArgs {
    init: Option<Path>,
}

impl Parse for HandlerArgs {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut init = None;
        while !input.is_empty() {
            let key: syn::Ident = input.parse()?;
            if key != "init" {
                return Err(Error::new(
                    key.span(),
                    format!("unknown option `{key}`; the only option is `init = path::to::fn`"),
                ));
            }
            input.parse::<Token![=]>()?;
            if init.is_some() {
                return Err(Error::new(key.span(), "`init` is given twice"));
            }
            init = Some(input.parse::<Path>()?);
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(Self { init })
    }
}

fn expand(args: HandlerArgs, func: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let sig = &func.sig;
    if sig.asyncness.is_some() {
        return Err(Error::new_spanned(
            sig.asyncness,
            "a kiln handler is a plain `fn`, not an `async fn`",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(Error::new_spanned(
            &sig.generics,
            "a kiln handler cannot be generic: the event and response types must be concrete",
        ));
    }
    if sig.inputs.len() != 2 || sig.inputs.iter().any(|a| matches!(a, FnArg::Receiver(_))) {
        return Err(Error::new_spanned(
            &sig.inputs,
            "a kiln handler takes exactly two arguments: `(event: YourEvent, ctx: &kiln_sdk::Context)`",
        ));
    }
    if matches!(sig.output, ReturnType::Default) {
        return Err(Error::new_spanned(
            sig,
            "a kiln handler returns `Result<YourResponse, kiln_sdk::Error>`",
        ));
    }

    let name = &sig.ident;
    let init = match &args.init {
        Some(path) => quote!(::core::option::Option::Some(#path as fn() -> _)),
        None => quote!(
            ::core::option::Option::<fn() -> ::core::result::Result<(), ::kiln_sdk::Error>>::None
        ),
    };
    let init_native = init.clone();
    let exported = syn::Ident::new("__KilnFunction", Span::call_site());

    Ok(quote! {
        #func

        /// The native entry point `kiln build --native` calls: runs the
        /// handler as a Lambda custom runtime.
        #[cfg(not(target_family = "wasm"))]
        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub fn __kiln_native_main() -> ! {
            ::kiln_sdk::__private::run_native(#name, #init_native)
        }

        #[cfg(target_family = "wasm")]
        const _: () = {
            struct #exported;

            impl ::kiln_sdk::__private::HandlerGuest for #exported {
                fn handle(
                    event: ::std::vec::Vec<u8>,
                    context: ::kiln_sdk::__private::WitContext,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::kiln_sdk::__private::FunctionError> {
                    ::kiln_sdk::__private::dispatch(#name, event, context)
                }
            }

            impl ::kiln_sdk::__private::LifecycleGuest for #exported {
                fn init() -> ::core::result::Result<(), ::kiln_sdk::__private::FunctionError> {
                    ::kiln_sdk::__private::init(#init)
                }
            }

            ::kiln_sdk::__private::export!(#exported with_types_in ::kiln_sdk::bindings);
        };
    })
}
