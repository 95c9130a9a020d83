from ltcache.cli import main

main()
